"""The queue's interface: what the rest of the node may ask of a queue backend.

SQLite (node.jobs.jobqueue, node.jobs.reports) is the only backend today; a
PostgreSQL one will implement the same two protocols. Whatever the backend, it
keeps these promises:
- record_instance returns only after the instance and all its jobs are durable
  in one transaction (the node answers the C-STORE after it);
- complete, complete_many, complete_stored and complete_stored_many are durable
  before they return
  (the caller then deletes spool files), and complete_stored records the
  stored index in the same transaction;
- claim, release, retry_later and defer_target may be lost in a crash: the job
  then just runs again or sooner;
- lookups do not wait behind a writer's commit;
- CommitmentRecords: record_commitment, settle_items and close_commitment are
  durable before they return (the node answers the N-ACTION-RQ, and forgets a
  delivered report, after them); record_commitment makes a sent commitment's
  forward jobs pending until its deadline in the same transaction; a queue
  opened with keep_finished remembers each finished instance (SOP Instance
  and Class UID) in the transaction that deletes its rows;
- is_known, open_targets and dead_letter_target count WAITING jobs (members of
  a group not yet sent) as open, like pending ones.

Series and study groups (GroupQueue, GroupOperations; SQL and its schema in
node.jobs.groups, which a backend may reuse: it is portable) add these:
- record_instance records each JobSpec whose `group` is set as a member of its
  group, in the same transaction as the instance: the job is inserted in state
  WAITING (never claimed by `claim`), the group (kind, target, level, Study
  Instance UID, Series Instance UID or "" for a study) is the newest version
  with that key if it is WAITING or HELD, else a new version; its members and
  last_arrival_at (now) are updated; every member of a version > 1 is a late
  arrival, counted in GroupTotals.late_arrivals in the same transaction;
- complete, complete_many and complete_stored mark the job's membership done in
  the same transaction (a purged job's membership stays not done);
- requeue_running first puts the running jobs of dispatched groups back to
  WAITING, so that the group is claimed (and sent) as a group again;
- dispatch_group and the operations are durable; claim_group and
  return_to_group may be lost in a crash like claim and release.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from node.jobs.commitments import (
    Commitment,
    CommitmentSummary,
    Direction,
    InstanceProgress,
    NewCommitment,
)
from node.jobs.model import (
    DeadLetter,
    Failure,
    GroupClaim,
    GroupReport,
    GroupTotals,
    Job,
    JobKind,
    JobSpec,
    JobState,
    ReceivedInstance,
    SpoolSummary,
    TargetReport,
)


class GroupQueue(Protocol):
    """Series and study groups as the node's timer and forward workers use them."""

    def waiting_groups(self) -> list[GroupReport]:
        """Groups in state WAITING or HELD, oldest first, with their member counts and the
        distinct SeriesDescriptions of their members (for required_series)."""
        ...

    def dispatch_group(self, group_id: int, reason: str, *, if_members: int | None = None) -> bool:
        """Make a WAITING group's jobs due together: the group becomes DISPATCHED, its store
        jobs pending; its forward jobs stay WAITING for claim_group. With if_members, only
        if it still has that many members (none arrived since the timer saw it stable).
        False if it was not dispatched."""
        ...

    def claim_group(self, kind: JobKind, target: str) -> GroupClaim | None:
        """Claim the WAITING jobs of the oldest DISPATCHED group of this target (running,
        attempts + 1), sorted by Series Number, Instance Number, then arrival. None if none."""
        ...

    def return_to_group(self, jobs: Sequence[Job], error: str | None = None) -> None:
        """Give claimed group jobs back to their dispatched group: WAITING again, attempts as
        before the claim. With an error, the first job was tried (the association broke
        during it): it keeps its attempt and the error as its last_error."""
        ...

    def settle_groups(self) -> list[GroupReport]:
        """Mark DISPATCHED groups whose every member is done DELIVERED; return those (state
        DELIVERED). Also forgets members of delivered groups and very old delivered groups."""
        ...


class JobQueue(GroupQueue, Protocol):
    """The worker-facing queue: intake, store workers, the forwarder and its holds."""

    # Intake and start-up.
    def record_instance(self, instance: ReceivedInstance, jobs: Sequence[JobSpec]) -> int: ...
    def spool_paths(self) -> set[Path]: ...
    def requeue_running(self) -> int: ...

    # The job lifecycle.
    def claim(self, kind: JobKind, *, target: str | None = None, limit: int = 16) -> list[Job]: ...
    def release(self, jobs: Sequence[Job]) -> None: ...
    def next_due_in(self, kind: JobKind, target: str | None = None) -> float | None: ...
    def complete(self, job: Job, result: str) -> Path | None: ...
    def complete_many(self, done: Sequence[tuple[Job, str]]) -> list[Path]: ...
    def complete_stored(self, job: Job, path: Path, transfer_syntax: str) -> Path | None: ...
    def complete_stored_many(self, done: Sequence[tuple[Job, Path, str]]) -> list[Path]: ...
    def retry_later(self, job: Job, error: str, delay: float) -> None: ...
    def dead_letter(self, job: Job, error: str) -> None: ...

    # Targets: gone from the config, or held while their peer is unreachable.
    def open_targets(self, kind: JobKind) -> list[str]: ...
    def dead_letter_target(self, kind: JobKind, target: str, error: str) -> int: ...
    def defer_target(
        self, kind: JobKind, target: str, until: float, *, new_only: bool = False
    ) -> None: ...
    def made_due_since(self, kind: JobKind, target: str, since: float) -> bool: ...

    # The stored index (duplicates policies, replacing a stored version).
    def stored_path(self, storage: str, sop_instance_uid: str) -> Path | None: ...
    def is_known(self, storage: str, sop_instance_uid: str) -> bool: ...

    def close(self) -> None: ...


class QueueReports(Protocol):
    """What `queue status`, `status`, the metrics and the systemd status line read."""

    def report(self) -> list[TargetReport]: ...
    def recent_failures(self, limit: int) -> list[Failure]: ...
    def spool_summary(self) -> SpoolSummary: ...
    # Dead letters newest first, a page at a time (the status page), and how many there are.
    def dead_letters(
        self, kind: JobKind | None, target: str | None, offset: int, limit: int
    ) -> list[DeadLetter]: ...
    def count_dead_letters(self, kind: JobKind | None, target: str | None) -> int: ...
    def waiting_groups(self) -> list[GroupReport]: ...  # as GroupQueue.waiting_groups
    def dispatched_groups(self) -> list[GroupReport]:
        """DISPATCHED groups not yet delivered; `reason` is the newest error of a member
        job that is failed or waiting for a retry, else why it was dispatched."""
        ...

    def group_totals(self) -> GroupTotals: ...


class GroupOperations(Protocol):
    """`dicom-node queue release` and `queue hold`: select groups by Study Instance UID or
    Series Instance UID (a study's series groups too), optionally one target."""

    def release_groups(
        self, *, study: str | None = None, series: str | None = None, target: str | None = None
    ) -> int:
        """Dispatch WAITING or HELD groups now (reason "released"); how many."""
        ...

    def hold_groups(
        self, *, study: str | None = None, series: str | None = None, target: str | None = None
    ) -> int:
        """WAITING groups become HELD: the timer leaves them until released; how many."""
        ...


class QueueOperations(QueueReports, GroupOperations, Protocol):
    """What an operator does to the queue, safely while the daemon runs."""

    def retry(
        self, kind: JobKind | None = None, target: str | None = None, *, failed: bool = False
    ) -> int: ...
    def purgeable(
        self, kind: JobKind | None, target: str | None, states: Sequence[JobState]
    ) -> int: ...
    def purge(
        self, kind: JobKind | None, target: str | None, states: Sequence[JobState]
    ) -> tuple[int, list[Path]]: ...
    def close(self) -> None: ...


class CommitmentRecords(Protocol):
    """Storage Commitment requests received and sent (node.jobs.commitments)."""

    def record_commitment(self, new: NewCommitment, waiting: Sequence[Job] = ()) -> int: ...
    def open_commitments(self, direction: Direction) -> list[Commitment]: ...
    def settle_items(self, commitment_id: int, reasons: Mapping[int, int]) -> None: ...
    def close_commitment(self, commitment_id: int) -> None: ...
    def defer_commitment(self, commitment_id: int, error: str, until: float) -> None: ...
    def instance_progress(
        self, sop_instance_uids: Sequence[str]
    ) -> dict[str, InstanceProgress]: ...
    def jobs_by_id(self, job_ids: Sequence[int]) -> list[Job]: ...
    def prune_finished(self, before: float) -> int: ...
    def commitment_summary(self) -> list[CommitmentSummary]: ...
