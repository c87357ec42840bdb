"""`dicom-node status`: a one-screen summary of a node, read from its queue database.

It works whether the node is running or not, and never writes: the database
is opened read-only, so it is safe next to a running node.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path

from node.config.model import Config, load_config
from node.daemon.queues import queue_settings
from node.jobs.backends import open_operations, queue_exists
from node.jobs.interface import QueueReports
from node.jobs.model import Failure, SpoolSummary, TargetSummary, summarise_targets

RECENT_FAILURES = 5
WIDTH = 100


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status", help="summarise a node from its database: queue, failures, last errors"
    )
    parser.add_argument(
        "-c", "--config", type=Path, default=Path("config.toml"), help="the node's config file"
    )


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    settings = queue_settings(config)
    if not queue_exists(settings):
        print(
            f"no queue database at {config.queue_path}: the node has not run with this config"
            " yet (check node.data_dir)"
        )
        return 1
    reports = open_operations(settings, read_only=True)
    try:
        print(render(config, *read_reports(reports, config)))
    finally:
        reports.close()
    return 0


def read_reports(
    reports: QueueReports, config: Config
) -> tuple[list[TargetSummary], list[Failure], SpoolSummary]:
    """What the screen shows: one line per target, the newest dead letters, the spool."""
    targets = summarise_targets(reports.report(), _configured_targets(config))
    return targets, reports.recent_failures(RECENT_FAILURES), reports.spool_summary()


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


def _configured_targets(config: Config) -> list[tuple[str, str]]:
    return [("store", s.name) for s in config.storage] + [
        ("forward", d.name) for d in config.destinations
    ]


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
    targets: Sequence[TargetSummary],
    failures: Sequence[Failure],
    spool: SpoolSummary,
) -> str:
    count, size, oldest = spool.instances, spool.size, spool.oldest_received_at
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
