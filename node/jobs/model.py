"""What the job queue holds: received instances, their jobs, and the jobs' states.

These records are the vocabulary of every queue backend (SQLite today): intake
records a ReceivedInstance with its JobSpecs, workers claim Jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


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
