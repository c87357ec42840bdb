"""The job queue workers use, on SQLite: intake, the job lifecycle, holds and the stored index.

An instance and all of its jobs are recorded in one durable transaction, and
the node answers the sender only after that commit. A job is claimed (running),
then completed (done), rescheduled (pending, later) or dead-lettered (failed).
A finished instance's rows are deleted, so a node that runs for years keeps a
small database; the `stored` index and the metrics keep the history.

Which writes are fsynced and why is said in node.jobs.database; lookups run on
its reader connection so that they never wait behind a commit.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from node.jobs import groups
from node.jobs.database import Database
from node.jobs.model import Job, JobKind, JobSpec, JobState, ReceivedInstance
from node.jobs.rows import JOB_COLUMNS as _JOB_COLUMNS
from node.jobs.rows import job_from_row as _job_from_row


def _insert_instance(
    db: sqlite3.Connection, instance: ReceivedInstance, jobs: Sequence[JobSpec]
) -> int:
    now = time.time()
    cursor = db.execute(
        "INSERT INTO instances (sop_instance_uid, sop_class_uid, transfer_syntax,"
        " calling_ae_title, called_ae_title, spool_path, size, received_at, header_values)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            instance.sop_instance_uid,
            instance.sop_class_uid,
            instance.transfer_syntax,
            instance.calling_ae_title,
            instance.called_ae_title,
            str(instance.spool_path),
            instance.size,
            now,
            json.dumps(dict(instance.header_values)) if instance.header_values else "",
        ),
    )
    instance_id = int(cursor.lastrowid or 0)
    db.executemany(
        "INSERT INTO jobs (instance_id, kind, target, state, next_attempt_at,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (instance_id, job.kind, job.target, JobState.PENDING, now, now, now)
            for job in jobs
            if job.group is None
        ],
    )
    for job in jobs:
        if job.group is not None:  # a member of a series or study group: waits for it
            groups.join_group(db, instance_id, job, instance.sop_instance_uid, now)
    return instance_id


def _complete_job(
    db: sqlite3.Connection, job: Job, result: str, keep_finished: bool = False
) -> int:
    """Mark a job done; delete its instance's rows when none is left open. Returns the open count.

    keep_finished: remember the finished SOP Instance UID (storage commitment asks later)."""
    now = time.time()
    db.execute(
        "UPDATE jobs SET state = ?, result = ?, last_error = NULL, updated_at = ? WHERE id = ?",
        (JobState.DONE, result, now, job.id),
    )
    groups.mark_member_done(db, job.id, now)
    (open_jobs,) = db.execute(
        "SELECT COUNT(*) FROM jobs WHERE instance_id = ? AND state != ?",
        (job.instance_id, JobState.DONE),
    ).fetchone()
    if not open_jobs:
        db.execute("DELETE FROM jobs WHERE instance_id = ?", (job.instance_id,))
        db.execute("DELETE FROM instances WHERE id = ?", (job.instance_id,))
        if keep_finished:
            _record_finished(db, job.instance)
    return int(open_jobs)


def _record_finished(db: sqlite3.Connection, instance: ReceivedInstance) -> None:
    """Into node.jobs.commitment_schema's finished_instances, in the deleting transaction."""
    uid = instance.sop_instance_uid
    db.execute("DELETE FROM finished_instances WHERE sop_instance_uid = ?", (uid,))
    db.execute(
        "INSERT INTO finished_instances (sop_instance_uid, sop_class_uid, finished_at)"
        " VALUES (?, ?, ?)",
        (uid, instance.sop_class_uid, time.time()),
    )


def _record_stored(db: sqlite3.Connection, job: Job, path: Path, transfer_syntax: str) -> None:
    db.execute(
        "INSERT OR REPLACE INTO stored (storage, sop_instance_uid, path, transfer_syntax,"
        " stored_at) VALUES (?, ?, ?, ?, ?)",
        (job.target, job.instance.sop_instance_uid, str(path), transfer_syntax, time.time()),
    )


class SqliteJobQueue(groups.SqliteGroups):
    """node.jobs.interface.JobQueue on SQLite. Safe to share between threads."""

    def __init__(self, database: Database, *, keep_finished: bool = False) -> None:
        """keep_finished: remember finished instances ([commitment] enabled needs it)."""
        self.database = database
        self.path = database.path
        self.keep_finished = keep_finished

    @classmethod
    def open(cls, path: Path) -> SqliteJobQueue:
        """A job queue on its own database (close() closes it)."""
        return cls(Database(path))

    def close(self) -> None:
        self.database.close()

    # Intake.

    def record_instance(self, instance: ReceivedInstance, jobs: Sequence[JobSpec]) -> int:
        """Record a spooled instance and its jobs durably; return the instance id.

        Returns only after the commit that holds this instance is on disk.
        """
        jobs = tuple(jobs)
        return int(self.database.write_durably(lambda db: _insert_instance(db, instance, jobs)))

    def spool_paths(self) -> set[Path]:
        """The spool files of every recorded instance (the others were never acknowledged)."""
        with self.database.read() as db:
            rows = db.execute("SELECT spool_path FROM instances").fetchall()
        return {Path(row[0]) for row in rows}

    # The job lifecycle.

    def requeue_running(self) -> int:
        """After a crash or restart, jobs that were in flight are simply pending again."""
        with self.database.transaction() as db:
            groups.requeue_group_members(db, time.time())  # sent as a group again
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
        with self.database.transaction(durable=False) as db:
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

    def release(self, jobs: Sequence[Job]) -> None:
        """Give back claimed jobs that were not tried: pending again, attempt count as before
        the claim. Not fsynced: if lost, requeue_running makes them pending at the next start."""
        with self.database.transaction(durable=False) as db:
            db.executemany(
                "UPDATE jobs SET state = ?, attempts = attempts - 1 WHERE id = ? AND state = ?",
                [(JobState.PENDING, job.id, JobState.RUNNING) for job in jobs],
            )

    def next_due_in(self, kind: JobKind, target: str | None = None) -> float | None:
        """Seconds until the next pending job of this kind is due (0 if one is due now)."""
        query = "SELECT MIN(next_attempt_at) FROM jobs WHERE state = ? AND kind = ?"
        params: list[object] = [JobState.PENDING, kind]
        if target is not None:
            query += " AND target = ?"
            params.append(target)
        with self.database.read() as db:
            (due,) = db.execute(query, params).fetchone()
        return None if due is None else max(0.0, due - time.time())

    def complete(self, job: Job, result: str) -> Path | None:
        """Mark a job done. Returns the spool path once every job of its instance is done."""
        # Durable: the caller deletes the spool file when this says the instance is finished.
        keep = self.keep_finished
        open_jobs = self.database.write_durably(lambda db: _complete_job(db, job, result, keep))
        return None if open_jobs else job.instance.spool_path

    def complete_many(self, done: Sequence[tuple[Job, str]]) -> list[Path]:
        """complete() for several jobs in one durable commit (the forwarder's completions
        arrive faster than one fsync each). Returns the spool paths of finished instances."""

        def work(db: sqlite3.Connection) -> list[Path]:
            return [
                job.instance.spool_path
                for job, result in done
                if not _complete_job(db, job, result, self.keep_finished)
            ]

        return list(self.database.write_durably(work))

    def complete_stored(self, job: Job, path: Path, transfer_syntax: str) -> Path | None:
        """complete() for a store job, recording where the instance now is in the same
        durable commit (the `stored` index behind duplicates policies and `dicom-node status`)."""

        def work(db: sqlite3.Connection) -> int:
            _record_stored(db, job, path, transfer_syntax)
            return _complete_job(db, job, str(path), self.keep_finished)

        open_jobs = self.database.write_durably(work)
        return None if open_jobs else job.instance.spool_path

    def complete_stored_many(self, done: Sequence[tuple[Job, Path, str]]) -> list[Path]:
        """complete_stored() for several store jobs (job, stored path, stored transfer syntax)
        in one durable commit. Returns the spool paths of finished instances."""

        def work(db: sqlite3.Connection) -> list[Path]:
            finished = []
            for job, path, transfer_syntax in done:
                _record_stored(db, job, path, transfer_syntax)
                if not _complete_job(db, job, str(path), self.keep_finished):
                    finished.append(job.instance.spool_path)
            return finished

        return list(self.database.write_durably(work))

    def retry_later(self, job: Job, error: str, delay: float) -> None:
        # Not fsynced: if lost, the job is simply retried sooner.
        with self.database.transaction(durable=False) as db:
            db.execute(
                "UPDATE jobs SET state = ?, last_error = ?, next_attempt_at = ?, updated_at = ?"
                " WHERE id = ?",
                (JobState.PENDING, error, time.time() + delay, time.time(), job.id),
            )

    def dead_letter(self, job: Job, error: str) -> None:
        with self.database.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, last_error = ?, updated_at = ? WHERE id = ?",
                (JobState.FAILED, error, time.time(), job.id),
            )

    # Targets: the ones gone from the config, and holds on unreachable destinations.

    def open_targets(self, kind: JobKind) -> list[str]:
        """Targets of this kind that have pending, running or waiting (grouped) jobs."""
        with self.database.read() as db:
            rows = db.execute(
                "SELECT DISTINCT target FROM jobs WHERE kind = ? AND state IN (?, ?, ?)",
                (kind, JobState.PENDING, JobState.RUNNING, JobState.WAITING),
            ).fetchall()
        return [row[0] for row in rows]

    def dead_letter_target(self, kind: JobKind, target: str, error: str) -> int:
        """Dead-letter every open job of a target (one no longer configured)."""
        with self.database.transaction() as db:
            return db.execute(
                "UPDATE jobs SET state = ?, last_error = ?, updated_at = ?"
                " WHERE kind = ? AND target = ? AND state IN (?, ?, ?)",
                (
                    JobState.FAILED,
                    error,
                    time.time(),
                    kind,
                    target,
                    JobState.PENDING,
                    JobState.RUNNING,
                    JobState.WAITING,
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
        with self.database.transaction(durable=False) as db:
            db.execute(
                "UPDATE jobs SET next_attempt_at = ?, updated_at = ?"
                " WHERE kind = ? AND target = ? AND state = ? AND next_attempt_at < ?" + only_new,
                (until, time.time(), kind, target, JobState.PENDING, until),
            )

    def made_due_since(self, kind: JobKind, target: str, since: float) -> bool:
        """Whether a job that existed at `since` was made due after it (`queue retry`)."""
        with self.database.read() as db:
            row = db.execute(
                "SELECT 1 FROM jobs WHERE kind = ? AND target = ? AND state = ?"
                " AND next_attempt_at <= ? AND updated_at > ? AND created_at <= ? LIMIT 1",
                (kind, target, JobState.PENDING, time.time(), since, since),
            ).fetchone()
        return row is not None

    # The stored index.

    def stored_path(self, storage: str, sop_instance_uid: str) -> Path | None:
        """Where a storage target last put this SOP Instance UID, if it has it."""
        with self.database.read() as db:
            row = db.execute(
                "SELECT path FROM stored WHERE storage = ? AND sop_instance_uid = ?",
                (storage, sop_instance_uid),
            ).fetchone()
        return Path(row[0]) if row else None

    def is_known(self, storage: str, sop_instance_uid: str) -> bool:
        """Whether the SOP Instance UID is stored in, or on its way to, a storage target."""
        with self.database.read() as db:
            row = db.execute(
                "SELECT 1 FROM stored WHERE storage = ? AND sop_instance_uid = ?"
                " UNION ALL SELECT 1 FROM jobs JOIN instances ON instances.id = jobs.instance_id"
                " WHERE jobs.kind = ? AND jobs.target = ? AND jobs.state IN (?, ?, ?)"
                " AND instances.sop_instance_uid = ? LIMIT 1",
                (
                    storage,
                    sop_instance_uid,
                    JobKind.STORE,
                    storage,
                    JobState.PENDING,
                    JobState.RUNNING,
                    JobState.WAITING,
                    sop_instance_uid,
                ),
            ).fetchone()
        return row is not None
