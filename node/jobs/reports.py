"""Operations and reports on the queue, on SQLite: what `dicom-node queue`, `dicom-node
status`, the metrics and the systemd status line read, and what an operator does.

The job report is one query (REPORT_SQL): jobs per kind, target and state, with
the oldest job, the next try, the most attempts and the newest error. Each view
folds its rows: `queue status` shows them as they are, `status` per target,
the metrics as gauges. Reports run on the database's reader connection, so a
scrape or a status never waits behind a commit; operations are safe while the
daemon runs (WAL and a busy timeout).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from node.jobs.database import Database
from node.jobs.groups import SqliteGroups
from node.jobs.model import (
    DeadLetter,
    Failure,
    JobKind,
    JobState,
    SpoolSummary,
    TargetReport,
)

# Newest error per (kind, target, state): SQLite takes the bare last_error from the row
# that holds MAX(updated_at).
REPORT_SQL = """
WITH newest_error AS (
    SELECT kind, target, state, last_error, MAX(updated_at) AS at FROM jobs
    WHERE last_error IS NOT NULL GROUP BY kind, target, state
)
SELECT jobs.kind, jobs.target, jobs.state, COUNT(*), MIN(jobs.created_at),
    MIN(jobs.next_attempt_at), MAX(jobs.attempts), newest_error.last_error, newest_error.at
FROM jobs LEFT JOIN newest_error USING (kind, target, state)
GROUP BY jobs.kind, jobs.target, jobs.state ORDER BY jobs.kind, jobs.target, jobs.state
"""


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


class SqliteQueueOperations(SqliteGroups):
    """node.jobs.interface.QueueOperations on SQLite (the group operations: SqliteGroups)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @classmethod
    def open(cls, path: Path, *, read_only: bool = False) -> SqliteQueueOperations:
        """Operations on their own database (close() closes it); read_only for reports only."""
        return cls(Database(path, read_only=read_only))

    def close(self) -> None:
        self.database.close()

    # Reports.

    def report(self) -> list[TargetReport]:
        """Jobs per kind, target and state (done ones too), on the reader connection."""
        with self.database.read() as db:
            rows = db.execute(REPORT_SQL).fetchall()
        return [TargetReport(*row) for row in rows]

    def recent_failures(self, limit: int) -> list[Failure]:
        with self.database.read() as db:
            rows = db.execute(
                "SELECT jobs.updated_at, jobs.kind, jobs.target, instances.sop_instance_uid,"
                " COALESCE(jobs.last_error, '') FROM jobs"
                " JOIN instances ON instances.id = jobs.instance_id"
                " WHERE jobs.state = ? ORDER BY jobs.updated_at DESC LIMIT ?",
                (JobState.FAILED, limit),
            ).fetchall()
        return [Failure(*row) for row in rows]

    def spool_summary(self) -> SpoolSummary:
        with self.database.read() as db:
            count, size, oldest = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(received_at) FROM instances"
            ).fetchone()
        return SpoolSummary(int(count), int(size), oldest)

    def dead_letters(
        self, kind: JobKind | None, target: str | None, offset: int, limit: int
    ) -> list[DeadLetter]:
        where, params = _target_filter(kind, target)
        with self.database.read() as db:
            rows = db.execute(
                "SELECT jobs.id, jobs.updated_at, jobs.kind, jobs.target,"
                " instances.sop_instance_uid, COALESCE(jobs.last_error, ''), jobs.attempts"
                " FROM jobs JOIN instances ON instances.id = jobs.instance_id"
                f" WHERE jobs.state = ? AND {where}"  # kind and target are only jobs' columns
                " ORDER BY jobs.updated_at DESC, jobs.id DESC LIMIT ? OFFSET ?",
                [JobState.FAILED, *params, limit, offset],
            ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def count_dead_letters(self, kind: JobKind | None, target: str | None) -> int:
        where, params = _target_filter(kind, target)
        with self.database.read() as db:
            (count,) = db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE state = ? AND {where}",
                [JobState.FAILED, *params],
            ).fetchone()
        return int(count)

    # Operations.

    def retry(
        self, kind: JobKind | None = None, target: str | None = None, *, failed: bool = False
    ) -> int:
        """Make waiting jobs due now; with failed=True also re-queue dead letters (attempts reset)."""
        where, params = _target_filter(kind, target)
        now = time.time()
        with self.database.transaction() as db:
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
        with self.database.read() as db:
            (count,) = db.execute(
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
        with self.database.transaction() as db:
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
            finished = _delete_finished_instances(db, instance_ids)
        return count, finished


def _delete_finished_instances(db: sqlite3.Connection, instance_ids: list[int]) -> list[Path]:
    finished: list[Path] = []
    for instance_id in instance_ids:
        (open_jobs,) = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE instance_id = ? AND state != ?",
            (instance_id, JobState.DONE),
        ).fetchone()
        if open_jobs:
            continue  # another target still needs this spool file
        row = db.execute("SELECT spool_path FROM instances WHERE id = ?", (instance_id,)).fetchone()
        db.execute("DELETE FROM jobs WHERE instance_id = ?", (instance_id,))
        db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
        if row is not None:
            finished.append(Path(row[0]))
    return finished
