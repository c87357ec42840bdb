"""`dicom-node queue status|retry|purge`: look at and act on the job queue, even while the
daemon runs (it opens its own SQLite connection; WAL and a busy timeout keep both safe)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from node.cli import groups_cli
from node.cli.commitment_status import print_commitments
from node.config.model import Config, load_config
from node.ingest.spool import Spool
from node.jobs.commitments import SqliteCommitments
from node.jobs.interface import CommitmentRecords, QueueOperations
from node.jobs.model import JobKind, JobState, TargetReport, open_jobs
from node.jobs.reports import SqliteQueueOperations
from node.jobs.retry import STORAGE_SCHEDULE, RetrySchedule

STATES = {
    "failed": (JobState.FAILED,),
    "pending": (JobState.PENDING,),
    "all": (JobState.PENDING, JobState.FAILED),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    queue = subparsers.add_parser("queue", help="show the job queue, retry or purge jobs")
    _add_config_option(queue, Path("config.toml"))
    actions = queue.add_subparsers(dest="queue_action", required=True, metavar="ACTION")

    status = actions.add_parser("status", help="jobs per target and state, oldest, last error")
    _add_config_option(status, argparse.SUPPRESS)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    retry = actions.add_parser(
        "retry", help="make waiting jobs due now; --failed also re-queues dead letters"
    )
    _add_config_option(retry, argparse.SUPPRESS)
    _add_target_options(retry)
    retry.add_argument(
        "--failed", action="store_true", help="also re-queue dead-lettered (failed) jobs"
    )

    purge = actions.add_parser(
        "purge", help="delete jobs for good (dead letters by default); needs --yes"
    )
    _add_config_option(purge, argparse.SUPPRESS)
    _add_target_options(purge)
    purge.add_argument(
        "--state",
        choices=sorted(STATES),
        default="failed",
        help="which jobs: failed (default), pending, or all (never running ones)",
    )
    purge.add_argument("--yes", action="store_true", help="really delete (else: dry run)")
    groups_cli.add_actions(actions, _add_config_option)


def _add_config_option(parser: argparse.ArgumentParser, default: object) -> None:
    # Accepted before or after the action: `queue -c X status` and `queue status -c X`.
    parser.add_argument(
        "-c", "--config", type=Path, default=default, help="config file (default: ./config.toml)"
    )


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--destination", metavar="NAME", help="only this [[destination]]")
    which.add_argument("--storage", metavar="NAME", help="only this [[storage]] target")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not config.queue_path.exists():
        print(f"no queue at {config.queue_path}: the node has not run with this config yet")
        return 0 if args.queue_action == "status" else 1
    queue = SqliteQueueOperations.open(config.queue_path)
    try:
        if args.queue_action == "status":
            commitments = SqliteCommitments(queue.database)
            return show_status(queue, config, as_json=args.json, commitments=commitments)
        if args.queue_action == "retry":
            return retry(queue, args)
        if args.queue_action in groups_cli.ACTIONS:
            return groups_cli.run(queue, args)
        return purge(queue, config, args)
    finally:
        queue.close()


def _selection(args: argparse.Namespace) -> tuple[JobKind | None, str | None, str]:
    if args.destination:
        return JobKind.FORWARD, args.destination, f"destination {args.destination!r}"
    if args.storage:
        return JobKind.STORE, args.storage, f"storage {args.storage!r}"
    return None, None, "all targets"


def retry(queue: QueueOperations, args: argparse.Namespace) -> int:
    kind, target, described = _selection(args)
    count = queue.retry(kind, target, failed=args.failed)
    what = "waiting and dead-lettered" if args.failed else "waiting"
    print(f"{count} {what} jobs of {described} are due now")
    return 0


def purge(queue: QueueOperations, config: Config, args: argparse.Namespace) -> int:
    kind, target, described = _selection(args)
    states = STATES[args.state]
    if not args.yes:
        count = queue.purgeable(kind, target, states)
        print(f"would delete {count} {args.state} jobs of {described}; add --yes to do it")
        return 1 if count else 0
    count, finished = queue.purge(kind, target, states)
    spool = Spool(config.spool_dir)
    for path in finished:
        spool.remove(path)  # no other job needs it any more
    print(
        f"deleted {count} {args.state} jobs of {described};"
        f" {len(finished)} spooled instances had no other job and were removed"
    )
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _next_try(row: TargetReport, now: float) -> str:
    if row.state != JobState.PENDING or row.next_attempt_at is None:
        return "-"
    wait = row.next_attempt_at - now
    return "now" if wait <= 0 else f"in {_age(wait)}"


def gives_up(config: Config) -> dict[tuple[str, str], str]:
    """When each configured target's jobs become dead letters: storage never (see node.jobs.retry)."""
    limits = {(JobKind.STORE.value, s.name): STORAGE_SCHEDULE for s in config.storage}
    for d in config.destinations:
        limits[(JobKind.FORWARD.value, d.name)] = RetrySchedule(d.retry)
    return {key: schedule.describe_limit() for key, schedule in limits.items()}


def show_status(
    queue: QueueOperations,
    config: Config,
    *,
    as_json: bool = False,
    commitments: CommitmentRecords | None = None,
) -> int:
    rows = open_jobs(queue.report())
    if as_json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
        return 0
    now = time.time()
    limits = gives_up(config)
    table = [
        (
            "KIND",
            "TARGET",
            "STATE",
            "JOBS",
            "OLDEST",
            "NEXT TRY",
            "ATTEMPTS",
            "GIVES UP",
            "LAST ERROR",
        )
    ]
    for row in rows:
        oldest = None if row.oldest_created_at is None else now - row.oldest_created_at
        table.append(
            (
                row.kind,
                row.target,
                row.state,
                str(row.count),
                _age(oldest),
                _next_try(row, now),
                str(row.max_attempts),
                limits.get((row.kind, row.target), "-"),
                row.last_error or "",
            )
        )
    busy = {(row.kind, row.target) for row in rows}
    for kind, name in [key for key in limits if key not in busy]:
        table.append((kind, name, "idle", "0", "-", "-", "-", limits[(kind, name)], ""))
    table[1:] = sorted(table[1:], key=lambda line: (line[1], line[0], line[2]))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[-1]]).rstrip())
    if commitments is not None:
        print_commitments(commitments)
    groups = groups_cli.group_lines(queue, now, _age)
    if groups:
        print("\nseries and study groups not yet delivered:")
        print("\n".join(groups))
    failed = sum(row.count for row in rows if row.state == JobState.FAILED)
    if failed:
        print(
            f"\n{failed} dead-lettered jobs: fix the cause, then `dicom-node queue retry --failed`",
            file=sys.stderr,
        )
    return 0
