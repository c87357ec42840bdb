"""Series and study groups on the PostgreSQL queue, shared by every node of a cluster
(and the sqlite3-shaped adapter node.jobs.postgres_commitments uses too).

The SQL of node.jobs.groups is portable, so it runs here as it is: PortableDatabase
gives it the small part of the sqlite3 API it uses (`?` placeholders, rowcount,
lastrowid) on the PostgreSQL pool. What a cluster changes is done here:
- every durable group write (dispatch, settle, release) runs under one advisory lock, so
  that two nodes' timers never settle or dispatch the same group twice (SQLite
  serialises its writers; PostgreSQL does not);
- a member joins its group under an advisory lock on the group's key, so that a study's
  first instances arriving on two nodes at once join one group, not two version 1s;
- claim_group takes only the members whose spool this node holds (all of them with a
  shared spool), with `FOR UPDATE SKIP LOCKED`, and leases them like any claim: a study
  whose associations landed on two nodes is one group, dispatched once, and each node
  sends the members it holds;
- requeue_group_members returns only this node's claims, and an expired lease on a
  dispatched group's member makes it WAITING again (node.jobs.postgres_schema), so that
  the group is claimed as a group again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import psycopg

from node.jobs import groups
from node.jobs.model import GroupClaim, GroupState, Job, JobKind, JobSpec, JobState
from node.jobs.rows import JOB_COLUMNS, job_from_row

if TYPE_CHECKING:
    from node.jobs.database import Database
    from node.jobs.postgres import PostgresDatabase

# The tables whose INSERTs node.jobs.groups reads `lastrowid` of.
_ID_TABLES = ("INSERT INTO jobs ", "INSERT INTO job_groups ", "INSERT INTO commitments ")
GROUP_WRITES_LOCK = 13  # with hashtext(current_schema()), as the migrations' lock


class PortableCursor:
    """What node.jobs.groups reads of a sqlite3 cursor."""

    def __init__(self, cursor: psycopg.Cursor[Any], lastrowid: int | None = None) -> None:
        self.cursor = cursor
        self.lastrowid = lastrowid
        self.rowcount = cursor.rowcount

    def fetchone(self) -> Any:
        return self.cursor.fetchone() if self.cursor.description is not None else None

    def fetchall(self) -> list[Any]:
        return self.cursor.fetchall() if self.cursor.description is not None else []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class PortableConnection:
    """A psycopg connection that takes node.jobs.groups' portable SQL as sqlite3 would."""

    def __init__(self, connection: psycopg.Connection[Any], count: Callable[[int], None]) -> None:
        self.connection = connection
        self.count = count

    @staticmethod
    def translate(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> PortableCursor:
        self.count(1)
        query = self.translate(sql)
        wants_id = sql.lstrip().startswith(_ID_TABLES) and "RETURNING" not in sql
        if wants_id:
            query += " RETURNING id"
        cursor = self.connection.cursor()
        cursor.execute(query, [_plain(value) for value in params])  # type: ignore[arg-type]
        lastrowid = None
        if wants_id:
            row = cursor.fetchone()
            lastrowid = int(row[0]) if row else None
        return PortableCursor(cursor, lastrowid)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.count(1)
        with self.connection.cursor() as cursor:
            cursor.executemany(
                self.translate(sql),  # type: ignore[arg-type]
                [[_plain(value) for value in row] for row in rows],
            )


def _plain(value: Any) -> Any:
    """Enum values as the text SQLite stores (psycopg would not guess their type)."""
    return str(value) if isinstance(value, str) else value


class PortableDatabase:
    """The read(), transaction() and write_durably() of node.jobs.database.Database, on the
    PostgreSQL pool; every durable write holds the cluster's group-writes lock."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database

    @contextmanager
    def read(self) -> Iterator[PortableConnection]:
        with self.database.connection() as connection:
            yield PortableConnection(connection, self.database.count_round_trips)

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[PortableConnection]:
        with self.database.connection() as connection, connection.transaction():
            self.database.count_round_trips(2)
            portable = PortableConnection(connection, self.database.count_round_trips)
            if durable:
                lock_group_writes(portable)
            yield portable

    def write_durably(self, work: Callable[[PortableConnection], Any]) -> Any:
        def run() -> Any:
            with self.transaction() as db:
                return work(db)

        return self.database._retrying(run)


def lock_group_writes(db: PortableConnection) -> None:
    db.execute(f"SELECT pg_advisory_xact_lock(hashtext(current_schema()), {GROUP_WRITES_LOCK})")


def join_groups(
    connection: psycopg.Connection[Any],
    database: PostgresDatabase,
    instance_id: int,
    jobs: Sequence[JobSpec],
    uid: str,
    now: float,
) -> None:
    """Record the grouped jobs of an instance, in its recording transaction."""
    db = PortableConnection(connection, database.count_round_trips)
    # jobs.node defaults to this setting (node.jobs.postgres_schema): groups' INSERT has no node.
    db.execute("SELECT set_config('dicom_node.node', ?, true)", (database.node,))
    for job in jobs:
        membership = job.group
        assert membership is not None
        key = "|".join(
            (
                str(job.kind),
                job.target,
                str(membership.trigger.level),
                membership.study_instance_uid,
                membership.series_instance_uid,
            )
        )
        db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (key,))
        groups.join_group(cast("Any", db), instance_id, job, uid, now)


class PostgresGroups(groups.SqliteGroups):
    """node.jobs.interface.GroupQueue, GroupOperations and the group reports, on PostgreSQL.

    Reports, dispatch, settling, release and hold are node.jobs.groups' own; claims and the
    restart rule are the cluster's."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.pg = database
        # node.jobs.groups is typed for SQLite's Database; PortableDatabase has what it uses.
        self.database = cast("Database", PortableDatabase(database))

    @property
    def _owner(self) -> str | None:
        return None if self.pg.settings.shared_spool else self.pg.node

    def claim_group(self, kind: JobKind, target: str) -> GroupClaim | None:
        """The WAITING members this node may send of the oldest dispatched group, leased."""
        owner = self._owner
        mine = "" if owner is None else " AND jobs.node = %(owner)s"
        find = (
            f"SELECT {groups._GROUP_COLUMNS} FROM job_groups g"
            " WHERE g.state = %(dispatched)s AND g.kind = %(kind)s AND g.target = %(target)s"
            f" AND EXISTS (SELECT 1 {groups._OPEN_MEMBER} AND jobs.state = %(waiting)s{mine})"
            " ORDER BY g.dispatched_at, g.id LIMIT 1"
        )
        params: dict[str, Any] = {
            "dispatched": str(GroupState.DISPATCHED),
            "kind": str(kind),
            "target": target,
            "waiting": str(JobState.WAITING),
            "owner": owner,
        }
        if not self.pg.execute(find, params):  # type: ignore[arg-type]
            return None  # asked before every claim: a plain read first
        now = time.time()

        def work(connection: psycopg.Connection[Any]) -> GroupClaim | None:
            row = connection.execute(find, params).fetchone()  # type: ignore[arg-type]
            if row is None:
                return None
            group = groups._group_from_row(row)
            rows = connection.execute(
                f"SELECT {JOB_COLUMNS} FROM job_group_members m"  # type: ignore[arg-type]
                " JOIN jobs ON jobs.id = m.job_id"
                " JOIN instances ON instances.id = jobs.instance_id"
                " WHERE m.group_id = %(group)s AND m.done_at IS NULL AND jobs.state = %(waiting)s"
                " AND jobs.kind = %(kind)s AND jobs.target = %(target)s"
                f" AND instances.sop_instance_uid = m.sop_instance_uid{mine}"
                " ORDER BY COALESCE(m.series_number, %(last)s), m.series_instance_uid,"
                " COALESCE(m.instance_number, %(last)s), m.arrived_at, m.job_id"
                " FOR UPDATE OF jobs SKIP LOCKED",
                {**params, "group": group.id, "last": groups._LAST},
            ).fetchall()
            connection.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = %s,"
                " claimed_by = %s, lease_until = %s WHERE id = ANY(%s)",
                (now, self.pg.node, now + self.pg.settings.lease, [row[0] for row in rows]),
            )
            if not rows:
                return None
            return GroupClaim(group, [groups._claimed(job_from_row(row)) for row in rows])

        return self.pg.in_transaction(work, statements=3)

    def return_to_group(self, jobs: Sequence[Job], error: str | None = None) -> None:
        """As on SQLite, and the claims are no longer this node's."""
        super().return_to_group(jobs, error)
        if jobs:
            self.pg.execute(
                "UPDATE jobs SET claimed_by = NULL, lease_until = NULL"
                " WHERE id = ANY(%s) AND state = 'waiting'",
                ([job.id for job in jobs],),
            )


def requeue_group_members(connection: psycopg.Connection[Any], node: str, now: float) -> int:
    """This node's running members of dispatched groups become WAITING again (at start and
    stop), so that their group is claimed and sent as one again."""
    return int(
        connection.execute(
            "UPDATE jobs SET state = 'waiting', claimed_by = NULL, lease_until = NULL,"
            " updated_at = %s WHERE state = 'running' AND claimed_by = %s AND id IN ("
            " SELECT m.job_id FROM job_group_members m JOIN job_groups g ON g.id = m.group_id"
            " WHERE g.state = 'dispatched' AND g.kind = 'forward' AND m.done_at IS NULL)",
            (now, node),
        ).rowcount
    )
