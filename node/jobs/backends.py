"""Which queue backend a node opens: SQLite (the default, one node) or PostgreSQL (a cluster).

The rest of the node holds the queue through node.jobs.interface's protocols only; this
is the one place that knows the backends' classes. PostgreSQL's modules (and psycopg) are
imported only when it is chosen, so a single node needs no server and no driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from node.jobs.interface import CommitmentRecords, JobQueue, QueueOperations

Backend = Literal["sqlite", "postgresql"]


@dataclass(frozen=True)
class QueueSettings:
    """[queue] as the jobs package needs it (node.daemon.queues builds it from a Config)."""

    backend: Backend
    sqlite_path: Path
    node: str
    dsn_file: Path | None = None
    lease: float = 60.0
    shared_spool: bool = False
    pool_size: int = 10
    # Remember finished instances (Storage Commitment asks about them later).
    keep_finished: bool = False


@dataclass
class OpenQueue:
    """A node's queue, reports and Storage Commitment records on one backend connection
    (pool); close() closes them all."""

    queue: JobQueue
    reports: QueueOperations
    commitments: CommitmentRecords
    close: Callable[[], None]


def _postgres_settings(settings: QueueSettings):  # type: ignore[no-untyped-def]
    from node.jobs.postgres import PostgresSettings, read_dsn_file

    if settings.dsn_file is None:
        raise ValueError('[queue] backend = "postgresql" needs dsn_file')
    return PostgresSettings(
        dsn=read_dsn_file(settings.dsn_file),
        node=settings.node,
        lease=settings.lease,
        shared_spool=settings.shared_spool,
        pool_size=settings.pool_size,
        keep_finished=settings.keep_finished,
    )


def open_queue(settings: QueueSettings) -> OpenQueue:
    """The node's job queue, its reports and commitment records, sharing one database."""
    if settings.backend == "postgresql":
        from node.jobs.postgres import PostgresDatabase, PostgresJobQueue
        from node.jobs.postgres_commitments import PostgresCommitments
        from node.jobs.postgres_reports import PostgresQueueOperations

        database = PostgresDatabase(_postgres_settings(settings))
        return OpenQueue(
            PostgresJobQueue(database),
            PostgresQueueOperations(database),
            PostgresCommitments(database),
            database.close,
        )
    from node.jobs.commitments import SqliteCommitments
    from node.jobs.database import Database
    from node.jobs.jobqueue import SqliteJobQueue
    from node.jobs.reports import SqliteQueueOperations

    sqlite = Database(settings.sqlite_path)
    return OpenQueue(
        SqliteJobQueue(sqlite, keep_finished=settings.keep_finished),
        SqliteQueueOperations(sqlite),
        SqliteCommitments(sqlite),
        sqlite.close,
    )


def open_job_queue(settings: QueueSettings, *, claims: bool = True) -> JobQueue:
    """A job queue of its own (a receiver process's: claims=False, it only records)."""
    if settings.backend == "postgresql":
        from node.jobs.postgres import PostgresJobQueue

        return PostgresJobQueue.open(_postgres_settings(settings), claims=claims)
    from node.jobs.jobqueue import SqliteJobQueue

    return SqliteJobQueue.open(settings.sqlite_path)


def queue_exists(settings: QueueSettings) -> bool:
    """Whether there is a queue to report on (a SQLite file; a server is always there)."""
    return settings.backend == "postgresql" or settings.sqlite_path.exists()


def open_operations(settings: QueueSettings, *, read_only: bool = False) -> QueueOperations:
    """Operations for `dicom-node queue` and `status` (read_only: reports only, SQLite)."""
    if settings.backend == "postgresql":
        from node.jobs.postgres_reports import PostgresQueueOperations

        return PostgresQueueOperations.open(_postgres_settings(settings))
    from node.jobs.reports import SqliteQueueOperations

    return SqliteQueueOperations.open(settings.sqlite_path, read_only=read_only)


def commitment_records(operations: QueueOperations) -> CommitmentRecords:
    """The Storage Commitment records on the database of `operations` (`queue status`)."""
    from node.jobs.database import Database

    database = getattr(operations, "database")  # noqa: B009  (both backends have one)
    if isinstance(database, Database):
        from node.jobs.commitments import SqliteCommitments

        return SqliteCommitments(database)
    from node.jobs.postgres_commitments import PostgresCommitments

    return PostgresCommitments(database)
