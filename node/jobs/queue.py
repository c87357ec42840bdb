"""The durable job queue: SQLite in WAL mode, one row per received instance and per job.

An instance and all of its jobs are recorded in one transaction, and the node
answers the sender only after that commit. With synchronous=FULL the commit is
on disk, so a kill -9 or a power cut right after the answer loses nothing.

Durable writes are shared (group commit): whoever finds no commit in flight
runs every durable write waiting so far (received instances from concurrent
associations, jobs completed by concurrent workers) in one transaction, so N
of them cost one WAL fsync, not N. Each caller still returns only after the
commit that holds its own write. Lookups use a second connection, so they
never wait behind a commit's fsync. Workers' bookkeeping (claiming a job,
indexing a stored file, rescheduling) is not fsynced on its own: losing it in a
power cut only makes a job run again, and the next durable commit persists it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    calling_ae_title TEXT NOT NULL,
    called_ae_title TEXT NOT NULL,
    spool_path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_uid ON instances (sop_instance_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    instance_id INTEGER NOT NULL REFERENCES instances (id),
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    result TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, kind, target, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_by_instance ON jobs (instance_id);
CREATE TABLE IF NOT EXISTS stored (
    storage TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    stored_at REAL NOT NULL,
    PRIMARY KEY (storage, sop_instance_uid)
);
"""


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


@dataclass(frozen=True)
class StateCount:
    kind: str
    target: str
    state: str
    count: int
    oldest_created_at: float | None
    last_error: str | None


_JOB_COLUMNS = """
    jobs.id, jobs.kind, jobs.target, jobs.attempts, jobs.instance_id,
    instances.sop_instance_uid, instances.sop_class_uid, instances.transfer_syntax,
    instances.calling_ae_title, instances.called_ae_title, instances.spool_path, instances.size
"""


def _job_from_row(row: sqlite3.Row) -> Job:
    instance = ReceivedInstance(
        sop_instance_uid=row[5],
        sop_class_uid=row[6],
        transfer_syntax=row[7],
        calling_ae_title=row[8],
        called_ae_title=row[9],
        spool_path=Path(row[10]),
        size=row[11],
    )
    return Job(
        id=row[0],
        kind=JobKind(row[1]),
        target=row[2],
        attempts=row[3],
        instance_id=row[4],
        instance=instance,
    )


def _complete_job(db: sqlite3.Connection, job: Job, result: str) -> int:
    """Mark a job done; delete its instance's rows when none is left open. Returns the open count."""
    now = time.time()
    db.execute(
        "UPDATE jobs SET state = ?, result = ?, last_error = NULL, updated_at = ? WHERE id = ?",
        (JobState.DONE, result, now, job.id),
    )
    (open_jobs,) = db.execute(
        "SELECT COUNT(*) FROM jobs WHERE instance_id = ? AND state != ?",
        (job.instance_id, JobState.DONE),
    ).fetchone()
    if not open_jobs:
        db.execute("DELETE FROM jobs WHERE instance_id = ?", (job.instance_id,))
        db.execute("DELETE FROM instances WHERE id = ?", (job.instance_id,))
    return int(open_jobs)


def connect(path: Path, *, timeout: float = 30.0) -> sqlite3.Connection:
    """Open the queue database with the settings every user of it must share."""
    connection = sqlite3.connect(
        path, timeout=timeout, isolation_level=None, check_same_thread=False
    )
    connection.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsynced at every commit, so an acknowledged instance survives power loss.
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    return connection


@dataclass
class _PendingWrite:
    """A durable write waiting for the group commit that will run it."""

    work: Callable[[sqlite3.Connection], Any]
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None

    def result(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class Queue:
    """All access to the job database. Safe to share between threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._connection = connect(path)
        self._lock = threading.Lock()
        self._reader = connect(path)
        self._read_lock = threading.Lock()
        self._pending: list[_PendingWrite] = []
        self._pending_lock = threading.Lock()
        self._committer = threading.Lock()  # held by the thread committing a batch
        # executescript manages its own transaction; CREATE ... IF NOT EXISTS is idempotent.
        self._connection.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._connection.close()
        with self._read_lock:
            self._reader.close()

    @contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; durable=False skips the fsync (see the module docstring)."""
        with self._lock:
            db = self._connection
            if not durable:
                db.execute("PRAGMA synchronous=NORMAL")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                if not durable:
                    db.execute("PRAGMA synchronous=FULL")

    def record_instance(self, instance: ReceivedInstance, jobs: Sequence[JobSpec]) -> int:
        """Record a spooled instance and its jobs durably; return the instance id.

        Returns only after the commit that holds this instance is on disk.
        """
        jobs = tuple(jobs)
        return int(self._write_durably(lambda db: self._insert_instance(db, instance, jobs)))

    def _write_durably(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run work in a durable transaction, shared with the writes waiting beside it."""
        write = _PendingWrite(work)
        with self._pending_lock:
            self._pending.append(write)
        with self._committer:
            if not write.done.is_set():
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._commit_batch(batch)
        return write.result()

    def _commit_batch(self, batch: list[_PendingWrite]) -> None:
        try:
            with self._transaction() as db:
                for write in batch:
                    write.value = write.work(db)
        except Exception as exc:
            if len(batch) > 1:
                # One failing write must not fail the others: run them one by one.
                for write in batch:
                    self._commit_batch([write])
                return
            batch[0].error = exc
        for write in batch:
            write.done.set()

    @staticmethod
    def _insert_instance(
        db: sqlite3.Connection, instance: ReceivedInstance, jobs: Sequence[JobSpec]
    ) -> int:
        now = time.time()
        cursor = db.execute(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, transfer_syntax,"
            " calling_ae_title, called_ae_title, spool_path, size, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                instance.sop_instance_uid,
                instance.sop_class_uid,
                instance.transfer_syntax,
                instance.calling_ae_title,
                instance.called_ae_title,
                str(instance.spool_path),
                instance.size,
                now,
            ),
        )
        instance_id = int(cursor.lastrowid or 0)
        db.executemany(
            "INSERT INTO jobs (instance_id, kind, target, state, next_attempt_at,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(instance_id, job.kind, job.target, JobState.PENDING, now, now, now) for job in jobs],
        )
        return instance_id

    def requeue_running(self) -> int:
        """After a crash or restart, jobs that were in flight are simply pending again."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ?",
                (JobState.PENDING, time.time(), JobState.RUNNING),
            )
            return cursor.rowcount

    def claim(self, kind: JobKind, *, target: str | None = None, limit: int = 16) -> list[Job]:
        """Mark up to `limit` due jobs as running and return them, oldest first."""
        now = time.time()
        where = "jobs.state = ? AND jobs.kind = ? AND jobs.next_attempt_at <= ?"
        params: list[object] = [JobState.PENDING, kind, now]
        if target is not None:
            where += " AND jobs.target = ?"
            params.append(target)
        # Not fsynced: a claim lost in a power cut leaves the job pending, as requeue_running would.
        with self._transaction(durable=False) as db:
            rows = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs JOIN instances ON instances.id = jobs.instance_id"
                f" WHERE {where} ORDER BY jobs.next_attempt_at, jobs.id LIMIT ?",
                [*params, limit],
            ).fetchall()
            db.executemany(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, updated_at = ? WHERE id = ?",
                [(JobState.RUNNING, now, row[0]) for row in rows],
            )
        # The rows were read before the UPDATE: the claim itself is one more attempt.
        return [replace(job, attempts=job.attempts + 1) for job in map(_job_from_row, rows)]

    def next_due_in(self, kind: JobKind, target: str | None = None) -> float | None:
        """Seconds until the next pending job of this kind is due (0 if one is due now)."""
        query = "SELECT MIN(next_attempt_at) FROM jobs WHERE state = ? AND kind = ?"
        params: list[object] = [JobState.PENDING, kind]
        if target is not None:
            query += " AND target = ?"
            params.append(target)
        with self._read_lock:
            (due,) = self._reader.execute(query, params).fetchone()
        return None if due is None else max(0.0, due - time.time())

    def complete(self, job: Job, result: str) -> Path | None:
        """Mark a job done. Returns the spool path once every job of its instance is done.

        A finished instance's rows are deleted, so a node that runs for years keeps
        a small database; the `stored` index and the metrics keep the history.
        """
        # Durable: the caller deletes the spool file when this says the instance is finished.
        open_jobs = self._write_durably(lambda db: _complete_job(db, job, result))
        return None if open_jobs else job.instance.spool_path

    def complete_many(self, done: Sequence[tuple[Job, str]]) -> list[Path]:
        """complete() for several jobs in one durable commit (the forwarder's completions
        arrive faster than one fsync each). Returns the spool paths of finished instances."""

        def work(db: sqlite3.Connection) -> list[Path]:
            return [
                job.instance.spool_path
                for job, result in done
                if not _complete_job(db, job, result)
            ]

        return list(self._write_durably(work))

    def release(self, jobs: Sequence[Job]) -> None:
        """Give back claimed jobs that were not tried: pending again, attempt count as before
        the claim. Not fsynced: if lost, requeue_running makes them pending at the next start."""
        with self._transaction(durable=False) as db:
            db.executemany(
                "UPDATE jobs SET state = ?, attempts = attempts - 1 WHERE id = ? AND state = ?",
                [(JobState.PENDING, job.id, JobState.RUNNING) for job in jobs],
            )

    def complete_stored(self, job: Job, path: Path, transfer_syntax: str) -> Path | None:
        """complete() for a store job, recording where the instance now is in the same
        durable commit (the `stored` index behind duplicates policies and `dicom-node status`)."""

        def work(db: sqlite3.Connection) -> int:
            db.execute(
                "INSERT OR REPLACE INTO stored (storage, sop_instance_uid, path, transfer_syntax,"
                " stored_at) VALUES (?, ?, ?, ?, ?)",
                (
                    job.target,
                    job.instance.sop_instance_uid,
                    str(path),
                    transfer_syntax,
                    time.time(),
                ),
            )
            return _complete_job(db, job, str(path))

        open_jobs = self._write_durably(work)
        return None if open_jobs else job.instance.spool_path

    def spool_paths(self) -> set[Path]:
        """The spool files of every recorded instance (the others were never acknowledged)."""
        with self._lock:
            rows = self._connection.execute("SELECT spool_path FROM instances").fetchall()
        return {Path(row[0]) for row in rows}

    def stored_path(self, storage: str, sop_instance_uid: str) -> Path | None:
        """Where a storage target last put this SOP Instance UID, if it has it."""
        with self._read_lock:
            row = self._reader.execute(
                "SELECT path FROM stored WHERE storage = ? AND sop_instance_uid = ?",
                (storage, sop_instance_uid),
            ).fetchone()
        return Path(row[0]) if row else None

    def is_known(self, storage: str, sop_instance_uid: str) -> bool:
        """Whether the SOP Instance UID is stored in, or on its way to, a storage target."""
        with self._read_lock:
            row = self._reader.execute(
                "SELECT 1 FROM stored WHERE storage = ? AND sop_instance_uid = ?"
                " UNION ALL SELECT 1 FROM jobs JOIN instances ON instances.id = jobs.instance_id"
                " WHERE jobs.kind = ? AND jobs.target = ? AND jobs.state IN (?, ?)"
                " AND instances.sop_instance_uid = ? LIMIT 1",
                (
                    storage,
                    sop_instance_uid,
                    JobKind.STORE,
                    storage,
                    JobState.PENDING,
                    JobState.RUNNING,
                    sop_instance_uid,
                ),
            ).fetchone()
        return row is not None

    def retry_later(self, job: Job, error: str, delay: float) -> None:
        # Not fsynced: if lost, the job is simply retried sooner.
        with self._transaction(durable=False) as db:
            db.execute(
                "UPDATE jobs SET state = ?, last_error = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (JobState.PENDING, error, time.time() + delay, time.time(), job.id),
            )

    def dead_letter(self, job: Job, error: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, last_error = ?, updated_at = ? WHERE id = ?",
                (JobState.FAILED, error, time.time(), job.id),
            )

    def open_targets(self, kind: JobKind) -> list[str]:
        """Targets of this kind that have pending or running jobs."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT DISTINCT target FROM jobs WHERE kind = ? AND state IN (?, ?)",
                (kind, JobState.PENDING, JobState.RUNNING),
            ).fetchall()
        return [row[0] for row in rows]

    def dead_letter_target(self, kind: JobKind, target: str, error: str) -> int:
        """Dead-letter every pending or running job of a target (one no longer configured)."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE jobs SET state = ?, last_error = ?, updated_at = ?"
                " WHERE kind = ? AND target = ? AND state IN (?, ?)",
                (
                    JobState.FAILED,
                    error,
                    time.time(),
                    kind,
                    target,
                    JobState.PENDING,
                    JobState.RUNNING,
                ),
            ).rowcount

    def defer_target(
        self, kind: JobKind, target: str, until: float, *, new_only: bool = False
    ) -> None:
        """Hold a target's pending jobs until `until` (its peer is unreachable).

        Attempts are unchanged: the jobs were not tried. new_only: only jobs nobody has
        touched since intake (not ones an operator just made due). Not fsynced: if lost,
        they are simply tried sooner."""
        only_new = " AND updated_at = created_at" if new_only else ""
        with self._transaction(durable=False) as db:
            db.execute(
                "UPDATE jobs SET next_attempt_at = ?, updated_at = ?"
                " WHERE kind = ? AND target = ? AND state = ? AND next_attempt_at < ?" + only_new,
                (until, time.time(), kind, target, JobState.PENDING, until),
            )

    def made_due_since(self, kind: JobKind, target: str, since: float) -> bool:
        """Whether a job that existed at `since` was made due after it (`queue retry`)."""
        with self._lock:
            row = self._connection.execute(
                "SELECT 1 FROM jobs WHERE kind = ? AND target = ? AND state = ?"
                " AND next_attempt_at <= ? AND updated_at > ? AND created_at <= ? LIMIT 1",
                (kind, target, JobState.PENDING, time.time(), since, since),
            ).fetchone()
        return row is not None

    def counts(self) -> list[StateCount]:
        """Jobs per kind, target and state, with the oldest job and the newest error."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT kind, target, state, COUNT(*), MIN(created_at),"
                " (SELECT last_error FROM jobs AS j WHERE j.kind = jobs.kind AND j.target = jobs.target"
                "  AND j.state = jobs.state AND j.last_error IS NOT NULL ORDER BY j.updated_at DESC LIMIT 1)"
                " FROM jobs GROUP BY kind, target, state ORDER BY kind, target, state"
            ).fetchall()
        return [StateCount(*row) for row in rows]


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


def _target_filter(kind: JobKind | None, target: str | None) -> tuple[str, list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    if kind is not None:
        clauses.append("kind = ?")
        params.append(kind)
    if target is not None:
        clauses.append("target = ?")
        params.append(target)
    return (" AND ".join(clauses) or "1"), params


class QueueOperations(Queue):
    """What an operator does to the queue, safely while the daemon runs (WAL, busy timeout)."""

    def report(self) -> list[TargetReport]:
        with self._lock:
            rows = self._connection.execute(
                "SELECT kind, target, state, COUNT(*), MIN(created_at), MIN(next_attempt_at),"
                " MAX(attempts),"
                " (SELECT last_error FROM jobs AS j WHERE j.kind = jobs.kind AND j.target = jobs.target"
                "  AND j.state = jobs.state AND j.last_error IS NOT NULL ORDER BY j.updated_at DESC LIMIT 1)"
                " FROM jobs WHERE state != ? GROUP BY kind, target, state ORDER BY kind, target, state",
                (JobState.DONE,),
            ).fetchall()
        return [TargetReport(*row) for row in rows]

    def retry(
        self, kind: JobKind | None = None, target: str | None = None, *, failed: bool = False
    ) -> int:
        """Make waiting jobs due now; with failed=True also re-queue dead letters (attempts reset)."""
        where, params = _target_filter(kind, target)
        now = time.time()
        with self._transaction() as db:
            count = db.execute(
                f"UPDATE jobs SET next_attempt_at = ?, updated_at = ? WHERE state = ? AND {where}",
                [now, now, JobState.PENDING, *params],
            ).rowcount
            if failed:
                count += db.execute(
                    "UPDATE jobs SET state = ?, attempts = 0, next_attempt_at = ?, updated_at = ?"
                    f" WHERE state = ? AND {where}",
                    [JobState.PENDING, now, now, JobState.FAILED, *params],
                ).rowcount
        return count

    def purgeable(
        self, kind: JobKind | None, target: str | None, states: Sequence[JobState]
    ) -> int:
        where, params = _target_filter(kind, target)
        marks = ", ".join("?" for _ in states)
        with self._lock:
            (count,) = self._connection.execute(
                f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks}) AND {where}",
                [*states, *params],
            ).fetchone()
        return int(count)

    def purge(
        self, kind: JobKind | None, target: str | None, states: Sequence[JobState]
    ) -> tuple[int, list[Path]]:
        """Delete jobs in `states` (never running ones). Returns how many, and the spool files
        of instances left with no open job: those are finished and the caller deletes them."""
        assert JobState.RUNNING not in states, "a worker holds running jobs"
        where, params = _target_filter(kind, target)
        marks = ", ".join("?" for _ in states)
        with self._transaction() as db:
            instance_ids = [
                row[0]
                for row in db.execute(
                    f"SELECT DISTINCT instance_id FROM jobs WHERE state IN ({marks}) AND {where}",
                    [*states, *params],
                ).fetchall()
            ]
            count = db.execute(
                f"DELETE FROM jobs WHERE state IN ({marks}) AND {where}", [*states, *params]
            ).rowcount
            finished = self._delete_finished_instances(db, instance_ids)
        return count, finished

    @staticmethod
    def _delete_finished_instances(db: sqlite3.Connection, instance_ids: list[int]) -> list[Path]:
        finished: list[Path] = []
        for instance_id in instance_ids:
            (open_jobs,) = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE instance_id = ? AND state != ?",
                (instance_id, JobState.DONE),
            ).fetchone()
            if open_jobs:
                continue  # another target still needs this spool file
            row = db.execute(
                "SELECT spool_path FROM instances WHERE id = ?", (instance_id,)
            ).fetchone()
            db.execute("DELETE FROM jobs WHERE instance_id = ?", (instance_id,))
            db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
            if row is not None:
                finished.append(Path(row[0]))
        return finished
