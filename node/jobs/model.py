"""What the job queue holds: received instances, their jobs, and the jobs' states.

These records are the vocabulary of every queue backend (SQLite today): intake
records a ReceivedInstance with its JobSpecs, workers claim Jobs, and reports
return TargetReports (one per kind, target and state), which each view folds.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
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
    WAITING = "waiting"  # a member of a series or study group that is not yet sent (groups)


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
    # When the queue recorded it (the C-STORE success followed): set on claimed jobs.
    received_at: float | None = None
    # Header values the storage layouts need, as (keyword, text) pairs read at intake, so a
    # store worker renders the path without parsing the file again; () when not recorded.
    header_values: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class JobSpec:
    kind: JobKind
    target: str
    # Set when the route delivers this target per series or study (node.jobs.groups). Not
    # part of equality: one instance has at most one job per target, whatever its routes.
    group: GroupMembership | None = field(default=None, compare=False)


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
class DeadLetter:
    """A dead letter as the status page pages them: the job, its instance's UID, why."""

    job_id: int
    at: float
    kind: str
    target: str
    sop_instance_uid: str
    error: str
    attempts: int


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
    if row.state in (JobState.PENDING, JobState.WAITING):  # waiting: in a series/study group
        times = [t for t in (summary.oldest_pending, row.oldest_created_at) if t is not None]
        changes.update(pending=summary.pending + row.count, oldest_pending=min(times, default=None))
    elif row.state == JobState.RUNNING:
        changes.update(running=row.count)
    elif row.state == JobState.FAILED:
        changes.update(failed=row.count)
    newest = summary.last_error_at
    if row.last_error is not None and (newest is None or (row.last_error_at or 0.0) > newest):
        changes.update(last_error=row.last_error, last_error_at=row.last_error_at)
    return replace(summary, **changes)


# Series and study groups (node.jobs.groups): a route with trigger = "series" or "study"
# makes each of its jobs a member of a group, sent when the group is stable.


class GroupLevel(StrEnum):
    SERIES = "series"
    STUDY = "study"


class GroupState(StrEnum):
    WAITING = "waiting"  # members may still arrive; the timer dispatches it
    HELD = "held"  # paused by `dicom-node queue hold`; only `queue release` dispatches it
    DISPATCHED = "dispatched"  # its jobs are due together; instances arriving now are late
    DELIVERED = "delivered"  # every member's job is done (kept to recognise late arrivals)


@dataclass(frozen=True)
class GroupTrigger:
    """A route's trigger, copied into each group it starts (a reload changes new groups only)."""

    level: GroupLevel
    route: str  # the route's name, or route[N]
    stable_after: float  # seconds without a new member
    force_after: float = 0.0  # seconds after the first member; 0 = never
    required_series: tuple[str, ...] = ()  # SeriesDescription globs that must all have arrived


@dataclass(frozen=True)
class GroupMembership:
    """What intake records with a grouped job: its group's key and the member's sort order."""

    trigger: GroupTrigger
    study_instance_uid: str
    series_instance_uid: str  # "" for a study group (members keep their own, see below)
    member_series_uid: str
    series_number: int | None
    instance_number: int | None
    series_description: str = ""
    expected_instances: int = 0  # from the route or the header; 0 = unknown


@dataclass(frozen=True)
class GroupReport:
    """A group as the timer, `queue status` and the metrics see it."""

    id: int
    kind: str
    target: str
    route: str
    level: str
    study_instance_uid: str
    series_instance_uid: str
    version: int
    state: str
    members: int
    first_arrival_at: float
    last_arrival_at: float
    stable_after: float
    force_after: float
    expected_instances: int
    required_series: tuple[str, ...]
    series_descriptions: tuple[str, ...]
    dispatched_at: float | None = None
    reason: str = ""  # why it was dispatched (stable, forced, complete, released)


@dataclass(frozen=True)
class GroupClaim:
    """A dispatched group's jobs claimed by one forward worker, in sending order
    (Series Number, then Instance Number, then arrival)."""

    group: GroupReport
    jobs: list[Job]


@dataclass(frozen=True)
class GroupTotals:
    """Counters kept in the queue database, so they survive restarts."""

    late_arrivals: int = 0  # instances that joined a new version of a dispatched group
    dispatched: int = 0


def group_due(group: GroupReport) -> tuple[float | None, str]:
    """When a WAITING group becomes due, and why; (None, "") for any other state.

    Stable: no new member for stable_after seconds. A route's conditions (first version
    only: a late follow-up group has just its stable timer) make a stable group wait until
    they hold: all expected instances there (then it is due at once, without waiting),
    every required_series glob matched by some member's SeriesDescription. force_after,
    from the first arrival, dispatches it whatever the rest says.
    """
    if group.state != GroupState.WAITING:
        return None, ""
    candidates: list[tuple[float, str]] = []
    if group.force_after:
        candidates.append(
            (group.first_arrival_at + group.force_after, f"forced after {group.force_after:g} s")
        )
    conditional = group.version == 1
    expected = group.expected_instances if conditional else 0
    missing = _missing_series(group) if conditional else []
    if expected and group.members >= expected:
        candidates.append(
            (group.last_arrival_at, f"complete: {group.members} of {expected} instances")
        )
    elif not expected and not missing:
        candidates.append(
            (group.last_arrival_at + group.stable_after, f"stable for {group.stable_after:g} s")
        )
    if not candidates:
        return None, ""
    return min(candidates)


def _missing_series(group: GroupReport) -> list[str]:
    return [
        pattern
        for pattern in group.required_series
        if not any(fnmatch.fnmatchcase(d, pattern) for d in group.series_descriptions)
    ]


def group_waits_for(group: GroupReport) -> str:
    """What a waiting group still needs, in words for `queue status`."""
    if group.state == GroupState.HELD:
        return "held by an operator: `dicom-node queue release`"
    needs = []
    if group.version == 1 and group.expected_instances > group.members:
        needs.append(f"{group.expected_instances - group.members} more instances")
    missing = _missing_series(group) if group.version == 1 else []
    if missing:
        needs.append("series " + ", ".join(repr(m) for m in missing))
    return "; ".join(needs)
