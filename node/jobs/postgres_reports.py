"""Operations and reports on the PostgreSQL queue (node.jobs.interface.QueueOperations).

The same views as on SQLite (node.jobs.reports), over the whole cluster: `queue status`,
`status` and the metrics of any node show every node's jobs, and `queue retry` or
`queue purge` from any node acts on all of them. `nodes()` adds what only a cluster has:
each node's heartbeat and how many instances wait in its spool.

A purge run on one node deletes the rows of every node's instances, but can delete spool
files only on its own machine: another node's files go when that node next starts
(Spool.prepare removes files no instance records).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from node.jobs.model import (
    DeadLetter,
    Failure,
    GroupReport,
    GroupTotals,
    JobKind,
    JobState,
    SpoolSummary,
    TargetReport,
)
from node.jobs.postgres import PostgresDatabase, PostgresSettings
from node.jobs.postgres_groups import PostgresGroups

# Newest error per (kind, target, state): DISTINCT ON keeps the row with the latest update.
REPORT_SQL = """
WITH newest_error AS (
    SELECT DISTINCT ON (kind, target, state) kind, target, state, last_error, updated_at AS at
    FROM jobs WHERE last_error IS NOT NULL ORDER BY kind, target, state, updated_at DESC
)
SELECT jobs.kind, jobs.target, jobs.state, COUNT(*), MIN(jobs.created_at),
    MIN(jobs.next_attempt_at), MAX(jobs.attempts), MAX(newest_error.last_error),
    MAX(newest_error.at)
FROM jobs LEFT JOIN newest_error USING (kind, target, state)
GROUP BY jobs.kind, jobs.target, jobs.state ORDER BY jobs.kind, jobs.target, jobs.state
"""

NODES_SQL = """
SELECT nodes.name, nodes.heartbeat_at,
    (SELECT COUNT(*) FROM instances WHERE instances.node = nodes.name),
    (SELECT COUNT(*) FROM jobs WHERE jobs.claimed_by = nodes.name AND jobs.state = 'running')
FROM nodes ORDER BY nodes.name
"""


@dataclass(frozen=True)
class NodeReport:
    """One node of the cluster as the queue sees it (a line of `queue status`)."""

    name: str
    heartbeat_at: float
    spooled_instances: int
    running_jobs: int


def _target_filter(kind: JobKind | None, target: str | None) -> tuple[str, list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    if kind is not None:
        clauses.append("kind = %s")
        params.append(str(kind))
    if target is not None:
        clauses.append("target = %s")
        params.append(target)
    return (" AND ".join(clauses) or "TRUE"), params


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


class PostgresQueueOperations:
    """node.jobs.interface.QueueOperations on PostgreSQL, for the whole cluster."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database
        self.groups = PostgresGroups(database)

    @classmethod
    def open(cls, settings: PostgresSettings) -> PostgresQueueOperations:
        """Operations on their own pool (close() closes it); they claim nothing."""
        return cls(PostgresDatabase(settings, claims=False))

    def close(self) -> None:
        self.database.close()

    # Reports.

    def report(self) -> list[TargetReport]:
        rows = self.database.execute(REPORT_SQL)
        return [
            TargetReport(
                kind=row[0],
                target=row[1],
                state=row[2],
                count=int(row[3]),
                oldest_created_at=_float(row[4]),
                next_attempt_at=_float(row[5]),
                max_attempts=int(row[6]),
                last_error=row[7],
                last_error_at=_float(row[8]),
            )
            for row in rows
        ]

    def recent_failures(self, limit: int) -> list[Failure]:
        rows = self.database.execute(
            "SELECT jobs.updated_at, jobs.kind, jobs.target, instances.sop_instance_uid,"
            " COALESCE(jobs.last_error, '') FROM jobs"
            " JOIN instances ON instances.id = jobs.instance_id"
            " WHERE jobs.state = 'failed' ORDER BY jobs.updated_at DESC LIMIT %s",
            (limit,),
        )
        return [Failure(float(row[0]), *row[1:]) for row in rows]

    def spool_summary(self) -> SpoolSummary:
        ((count, size, oldest),) = self.database.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(received_at) FROM instances"
        )
        return SpoolSummary(int(count), int(size), _float(oldest))

    def dead_letters(
        self, kind: JobKind | None, target: str | None, offset: int, limit: int
    ) -> list[DeadLetter]:
        where, params = _target_filter(kind, target)
        where = where.replace("kind =", "jobs.kind =").replace("target =", "jobs.target =")
        rows = self.database.execute(
            "SELECT jobs.id, jobs.updated_at, jobs.kind, jobs.target,"
            " instances.sop_instance_uid, COALESCE(jobs.last_error, ''), jobs.attempts"
            " FROM jobs JOIN instances ON instances.id = jobs.instance_id"
            f" WHERE jobs.state = 'failed' AND {where}"
            " ORDER BY jobs.updated_at DESC, jobs.id DESC LIMIT %s OFFSET %s",
            [*params, limit, offset],
        )
        return [DeadLetter(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5], int(r[6])) for r in rows]

    def count_dead_letters(self, kind: JobKind | None, target: str | None) -> int:
        where, params = _target_filter(kind, target)
        ((count,),) = self.database.execute(
            f"SELECT COUNT(*) FROM jobs WHERE state = 'failed' AND {where}", params
        )
        return int(count)

    def nodes(self) -> list[NodeReport]:
        """Every node that ever joined: heartbeat, instances in its spool, jobs it runs."""
        return [
            NodeReport(row[0], float(row[1]), int(row[2]), int(row[3]))
            for row in self.database.execute(NODES_SQL)
        ]

    # Series and study groups, the cluster's (node.jobs.postgres_groups).

    def waiting_groups(self) -> list[GroupReport]:
        return self.groups.waiting_groups()

    def dispatched_groups(self) -> list[GroupReport]:
        return self.groups.dispatched_groups()

    def group_totals(self) -> GroupTotals:
        return self.groups.group_totals()

    def release_groups(
        self, *, study: str | None = None, series: str | None = None, target: str | None = None
    ) -> int:
        return self.groups.release_groups(study=study, series=series, target=target)

    def hold_groups(
        self, *, study: str | None = None, series: str | None = None, target: str | None = None
    ) -> int:
        return self.groups.hold_groups(study=study, series=series, target=target)

    # Operations.

    def retry(
        self, kind: JobKind | None = None, target: str | None = None, *, failed: bool = False
    ) -> int:
        """Make waiting jobs due now; with failed=True also re-queue dead letters."""
        where, params = _target_filter(kind, target)
        now = time.time()

        def work(connection: psycopg.Connection[Any]) -> int:
            count = connection.execute(
                "UPDATE jobs SET next_attempt_at = %s, updated_at = %s"
                f" WHERE state = 'pending' AND {where}",  # type: ignore[arg-type]
                [now, now, *params],
            ).rowcount
            if failed:
                count += connection.execute(
                    "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = %s,"
                    f" updated_at = %s WHERE state = 'failed' AND {where}",  # type: ignore[arg-type]
                    [now, now, *params],
                ).rowcount
            return int(count)

        return self.database.in_transaction(work, statements=2 if failed else 1)

    def purgeable(
        self, kind: JobKind | None, target: str | None, states: Sequence[JobState]
    ) -> int:
        where, params = _target_filter(kind, target)
        ((count,),) = self.database.execute(
            f"SELECT COUNT(*) FROM jobs WHERE state = ANY(%s) AND {where}",
            [[str(state) for state in states], *params],
        )
        return int(count)

    def purge(
        self, kind: JobKind | None, target: str | None, states: Sequence[JobState]
    ) -> tuple[int, list[Path]]:
        """Delete jobs in `states` (never running ones). Returns how many, and the spool files
        of instances left with no open job."""
        assert JobState.RUNNING not in states, "a worker holds running jobs"
        where, params = _target_filter(kind, target)
        wanted = [str(state) for state in states]

        def work(connection: psycopg.Connection[Any]) -> tuple[int, list[Path]]:
            instance_ids = [
                row[0]
                for row in connection.execute(
                    f"SELECT DISTINCT instance_id FROM jobs WHERE state = ANY(%s) AND {where}"  # type: ignore[arg-type]
                    " ORDER BY instance_id",
                    [wanted, *params],
                )
            ]
            # The instances first, in id order, as the completion functions lock them.
            connection.execute(
                "SELECT 1 FROM instances WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                (instance_ids,),
            )
            count = connection.execute(
                f"DELETE FROM jobs WHERE state = ANY(%s) AND {where}",  # type: ignore[arg-type]
                [wanted, *params],
            ).rowcount
            finished = connection.execute(
                "DELETE FROM instances WHERE id = ANY(%s) AND NOT EXISTS"
                " (SELECT 1 FROM jobs WHERE jobs.instance_id = instances.id"
                " AND jobs.state <> 'done') RETURNING spool_path",
                (instance_ids,),
            ).fetchall()
            return int(count), [Path(row[0]) for row in finished]

        return self.database.in_transaction(work, statements=4)
