"""The queue backends the backend-neutral queue tests run on (tests/jobs/test_groups.py).

A backend is a pair: the worker-facing JobQueue and the operator's QueueOperations on
the same store. Another backend (PostgreSQL) adds itself to BACKENDS and to `queues`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.jobs.database import Database
from node.jobs.interface import JobQueue, QueueOperations
from node.jobs.jobqueue import SqliteJobQueue
from node.jobs.reports import SqliteQueueOperations

BACKENDS = ["sqlite"]


@dataclass
class Queues:
    jobs: JobQueue
    operations: QueueOperations
    folder: Path  # for spool files the records point at


@pytest.fixture(params=BACKENDS)
def queues(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Queues]:
    if request.param == "sqlite":
        database = Database(tmp_path / "data" / "queue.sqlite3")
        yield Queues(SqliteJobQueue(database), SqliteQueueOperations(database), tmp_path)
        database.close()
        return
    raise AssertionError(f"unknown queue backend {request.param}")
