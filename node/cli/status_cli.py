"""`dicom-node status`: a one-screen summary of a node, read from its queue database.

It works whether the node is running or not, and never writes: the database
is opened read-only, so it is safe next to a running node.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from node.config.model import Config, load_config
from node.jobs.model import Failure, SpoolSummary, TargetSummary
from node.jobs.reports import SqliteQueueOperations

# The one source of the status, shared with the status page's /api/status.
from node.web.status import read_reports, running_pid, status_report

WIDTH = 100


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status", help="summarise a node from its database: queue, failures, last errors"
    )
    parser.add_argument(
        "-c", "--config", type=Path, default=Path("config.toml"), help="the node's config file"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the status as JSON (what /api/status serves)"
    )


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not config.queue_path.exists():
        print(
            f"no queue database at {config.queue_path}: the node has not run with this config"
            " yet (check node.data_dir)"
        )
        return 1
    reports = SqliteQueueOperations.open(config.queue_path, read_only=True)
    try:
        if args.json:
            print(json.dumps(status_report(config, reports), indent=2))
        else:
            print(render(config, *read_reports(reports, config)))
    finally:
        reports.close()
    return 0


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
