"""What the job queue holds: received instances, their jobs, and the jobs' states.

These records are the vocabulary of every queue backend (SQLite today): intake
records a ReceivedInstance with its JobSpecs, workers claim Jobs, and reports
return TargetReports (one per kind, target and state), which each view folds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any


class JobKind(StrEnum):
    STORE = "store"
    FORWARD = "forward"


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # dead letter: needs an operator's `queue retry`


@dataclass(frozen=True)
class ReceivedInstance:
    """What intake knows about an instance once its bytes are spooled."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    calling_ae_title: str
    called_ae_title: str
    spool_path: Path
    size: int
    # Header values the storage layouts need, as (keyword, text) pairs read at intake, so a
    # store worker renders the path without parsing the file again; () when not recorded.
    header_values: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class JobSpec:
    kind: JobKind
    target: str


@dataclass(frozen=True)
class Job:
    id: int
    kind: JobKind
    target: str
    attempts: int
    instance_id: int
    instance: ReceivedInstance


@dataclass(frozen=True)
class TargetReport:
    """One line of `dicom-node queue status`: a target's jobs in one state."""

    kind: str
    target: str
    state: str
    count: int
    oldest_created_at: float | None
    next_attempt_at: float | None
    max_attempts: int
    last_error: str | None
    last_error_at: float | None = None


@dataclass(frozen=True)
class TargetSummary:
    """One target's jobs over all states (a line of `dicom-node status`)."""

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
    """A dead letter, newest first in `dicom-node status`."""

    at: float
    kind: str
    target: str
    sop_instance_uid: str
    error: str


@dataclass(frozen=True)
class SpoolSummary:
    """Instances waiting in the spool, their bytes, and when the oldest arrived."""

    instances: int
    size: int
    oldest_received_at: float | None


def open_jobs(rows: Iterable[TargetReport]) -> list[TargetReport]:
    """The rows an operator looks at: done jobs only wait for their instance's other jobs."""
    return [row for row in rows if row.state != JobState.DONE]


def count_in(rows: Iterable[TargetReport], *states: JobState) -> int:
    return sum(row.count for row in rows if row.state in states)


def summarise_targets(
    rows: Iterable[TargetReport], configured: Sequence[tuple[str, str]] = ()
) -> list[TargetSummary]:
    """One summary per configured (kind, target), then any other target with jobs."""
    found = {key: TargetSummary(*key) for key in configured}
    for row in rows:
        key = (row.kind, row.target)
        found[key] = _with_row(found.get(key) or TargetSummary(*key), row)
    return list(found.values())


def _with_row(summary: TargetSummary, row: TargetReport) -> TargetSummary:
    changes: dict[str, Any] = {}
    if row.state == JobState.PENDING:
        changes.update(pending=row.count, oldest_pending=row.oldest_created_at)
    elif row.state == JobState.RUNNING:
        changes.update(running=row.count)
    elif row.state == JobState.FAILED:
        changes.update(failed=row.count)
    newest = summary.last_error_at
    if row.last_error is not None and (newest is None or (row.last_error_at or 0.0) > newest):
        changes.update(last_error=row.last_error, last_error_at=row.last_error_at)
    return replace(summary, **changes)
