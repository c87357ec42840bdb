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
- lookups do not wait behind a writer's commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from node.jobs.model import (
    Failure,
    Job,
    JobKind,
    JobSpec,
    JobState,
    ReceivedInstance,
    SpoolSummary,
    TargetReport,
)


class JobQueue(Protocol):
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


class QueueOperations(QueueReports, Protocol):
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
