"""`dicom-node status`: a one-screen summary of a node, read from its queue database.

It works whether the node is running or not, and never writes: the database
is opened read-only, so it is safe next to a running node.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sqlite3
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from node.config.model import Config, load_config

RECENT_FAILURES = 5
WIDTH = 100


@dataclass(frozen=True)
class TargetRow:
    kind: str
    target: str
    pending: int = 0
    running: int = 0
    failed: int = 0
    oldest_pending: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass(frozen=True)
class Failure:
    at: float
    kind: str
    target: str
    sop_instance_uid: str
    error: str


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status", help="summarise a node from its database: queue, failures, last errors"
    )
    parser.add_argument(
        "-c", "--config", type=Path, default=Path("config.toml"), help="the node's config file"
    )


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not config.queue_path.exists():
        print(
            f"no queue database at {config.queue_path}: the node has not run with this config"
            " yet (check node.data_dir)"
        )
        return 1
    with closing(open_read_only(config.queue_path)) as db:
        print(render(config, read_targets(db, config), read_failures(db), read_spool(db)))
    return 0


def running_pid(data_dir: Path) -> int | None:
    """The PID of the node holding data_dir's lock (see node.lifecycle), or None."""
    try:
        fd = os.open(data_dir / "node.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else 0
    finally:
        os.close(fd)  # also drops the shared lock if we got it
    return None


def open_read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)


def _configured_targets(config: Config) -> list[tuple[str, str]]:
    return [("store", s.name) for s in config.storage] + [
        ("forward", d.name) for d in config.destinations
    ]


def read_targets(db: sqlite3.Connection, config: Config) -> list[TargetRow]:
    """One row per configured target, plus any target the queue still holds jobs for."""
    rows: dict[tuple[str, str], dict[str, object]] = {
        key: {} for key in _configured_targets(config)
    }
    for kind, target, state, count, oldest in db.execute(
        "SELECT kind, target, state, COUNT(*), MIN(created_at) FROM jobs"
        " WHERE state != 'done' GROUP BY kind, target, state"
    ):
        row = rows.setdefault((kind, target), {})
        row[state] = count
        if state == "pending":
            row["oldest_pending"] = oldest
    for kind, target, error, at in db.execute(
        "SELECT kind, target, last_error, MAX(updated_at) FROM jobs"
        " WHERE last_error IS NOT NULL GROUP BY kind, target"
    ):
        row = rows.setdefault((kind, target), {})
        row["last_error"], row["last_error_at"] = error, at
    return [TargetRow(kind, target, **values) for (kind, target), values in rows.items()]  # type: ignore[arg-type]


def read_failures(db: sqlite3.Connection, limit: int = RECENT_FAILURES) -> list[Failure]:
    return [
        Failure(*row)
        for row in db.execute(
            "SELECT jobs.updated_at, jobs.kind, jobs.target, instances.sop_instance_uid,"
            " COALESCE(jobs.last_error, '') FROM jobs JOIN instances ON instances.id = jobs.instance_id"
            " WHERE jobs.state = 'failed' ORDER BY jobs.updated_at DESC LIMIT ?",
            (limit,),
        )
    ]


def read_spool(db: sqlite3.Connection) -> tuple[int, int, float | None]:
    """Instances waiting in the spool, their bytes, and when the oldest arrived."""
    count, size, oldest = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(received_at) FROM instances"
    ).fetchone()
    return int(count), int(size), oldest


def ago(then: float | None, now: float | None = None) -> str:
    if then is None:
        return "-"
    seconds = max(0.0, (now or time.time()) - then)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render(
    config: Config,
    targets: Sequence[TargetRow],
    failures: Sequence[Failure],
    spool: tuple[int, int, float | None],
) -> str:
    count, size, oldest = spool
    pid = running_pid(config.node.data_dir)
    state = "not running" if pid is None else f"running (pid {pid})"
    lines = [
        f"dicom-node {config.node.ae_title} on {config.node.host}:{config.node.port}: {state}",
        f"config {config.source}",
        f"queue  {config.queue_path}",
        f"spool  {count} instances, {size / 1e6:.1f} MB waiting; oldest received {ago(oldest)}",
        "",
        f"{'KIND':<8} {'TARGET':<20} {'PENDING':>8} {'RUNNING':>8} {'FAILED':>7}  OLDEST PENDING",
    ]
    for row in targets:
        lines.append(
            f"{row.kind:<8} {row.target:<20} {row.pending:>8} {row.running:>8} {row.failed:>7}"
            f"  {ago(row.oldest_pending)}"
        )
    errors = [row for row in targets if row.last_error]
    lines += ["", "last error per target:" if errors else "last error per target: none"]
    for row in errors:
        where = f"  {row.kind} {row.target} ({ago(row.last_error_at)}): "
        lines.append(where + _clip(row.last_error or "", WIDTH - len(where)))
    if failures:
        lines += [
            "",
            "recent failures (dead letters; `dicom-node queue retry --failed` sends them again):",
        ]
        for failure in failures:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(failure.at))
            lines.append(
                f"  {stamp} {failure.kind} {failure.target} {failure.sop_instance_uid}: "
                + _clip(failure.error, 60)
            )
    else:
        lines += ["", "recent failures: none"]
    return "\n".join(lines)
