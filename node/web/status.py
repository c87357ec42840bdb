"""The node's status as data: what `dicom-node status --json` prints and `/api/status`
serves, from this one function, so the two agree field for field.

It is read from the config and the queue database (through node.jobs' reports), never
from the running process's memory, so the CLI gives the same answer whether the node
runs or not. Timestamps are seconds since the epoch; sizes are bytes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from pathlib import Path
from typing import Any

from node.config.model import Config
from node.jobs.interface import QueueReports
from node.jobs.model import Failure, SpoolSummary, TargetSummary, summarise_targets

RECENT_FAILURES = 5


def read_reports(
    reports: QueueReports, config: Config
) -> tuple[list[TargetSummary], list[Failure], SpoolSummary]:
    """One summary per target, the newest dead letters, the spool."""
    targets = summarise_targets(reports.report(), configured_targets(config))
    return targets, reports.recent_failures(RECENT_FAILURES), reports.spool_summary()


def configured_targets(config: Config) -> list[tuple[str, str]]:
    return [("store", s.name) for s in config.storage] + [
        ("forward", d.name) for d in config.destinations
    ]


def running_pid(data_dir: Path) -> int | None:
    """The PID of the node holding data_dir's lock (see node.daemon.lifecycle), or None."""
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


def status_report(config: Config, reports: QueueReports) -> dict[str, Any]:
    """The status, as JSON-ready data."""
    targets, failures, spool = read_reports(reports, config)
    pid = running_pid(config.node.data_dir)
    return {
        "node": {
            "ae_title": config.node.ae_title,
            "host": config.node.host,
            "port": config.node.port,
            "running": pid is not None,
            "pid": pid,
        },
        "config": str(config.source),
        "queue": str(config.queue_path),
        "spool": {
            "instances": spool.instances,
            "bytes": spool.size,
            "oldest_received_at": spool.oldest_received_at,
        },
        "targets": [dataclasses.asdict(target) for target in targets],
        "recent_failures": [dataclasses.asdict(failure) for failure in failures],
    }
