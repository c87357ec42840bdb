"""The job queue on PostgreSQL, shared by every node of a cluster (node.jobs.interface.JobQueue).

Connections come from a psycopg_pool pool and run in autocommit: each durable write is
one statement, so one round trip and one commit, and returns only once PostgreSQL has
made that commit durable (the node refuses a server with fsync or synchronous_commit
off). record_instance writes the instance and all its jobs in one statement; claim picks
due jobs with `SELECT ... FOR UPDATE SKIP LOCKED` and marks them running in the same
statement, so nodes claiming at once never take the same job and never wait for each
other. Completions run server-side functions (node.jobs.postgres_schema) that lock the
instance, so the last job done deletes it exactly once.

What a cluster changes, and why:
- A job belongs to the node whose spool holds its file (`jobs.node`): a node claims only
  its own, unless [queue] shared_spool says every node reads every spool (a shared
  filesystem mounted at the same path). A shared-nothing node that dies leaves its
  backlog on its disk: those instances are delayed until it is back, never lost.
- A claimed job carries a lease (`lease_until`), renewed by its node's heartbeat thread
  every lease/3 seconds. When a node dies, its leases expire and any node's heartbeat
  returns those jobs to the queue (with shared_spool another node then runs them).
- Holds on a destination (defer_target, made_due_since), the stored index and the
  duplicates lookups are the cluster's, not the node's: every node sees them.
- requeue_running, at start and stop, returns only this node's claims.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg
from psycopg_pool import ConnectionPool

from node.jobs.model import (
    GroupClaim,
    GroupReport,
    Job,
    JobKind,
    JobSpec,
    ReceivedInstance,
)
from node.jobs.postgres_groups import PostgresGroups, join_groups, requeue_group_members
from node.jobs.postgres_schema import MIGRATIONS_TABLE, all_migrations
from node.jobs.rows import JOB_COLUMNS, job_from_row

log = logging.getLogger("node.jobs.postgres")

T = TypeVar("T")

# Errors after which the same statement, run again, may well succeed.
RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


class UnsafeServer(Exception):
    """The PostgreSQL server would acknowledge commits that a crash can lose."""


@dataclass(frozen=True)
class PostgresSettings:
    """What the backend needs from [queue] and [node]."""

    dsn: str
    node: str
    lease: float = 60.0
    shared_spool: bool = False
    pool_size: int = 10
    keep_finished: bool = False  # remember finished instances (Storage Commitment)


def read_dsn_file(path: Path) -> str:
    """The libpq connection string kept in `[queue] dsn_file` (it may hold a password)."""
    text = path.read_text().strip()
    if not text:
        raise ValueError(f"{path} is empty: it should hold a libpq connection string")
    return text


class PostgresDatabase:
    """The pool, the schema and the heartbeat: one per node process, shared by its threads."""

    def __init__(self, settings: PostgresSettings, *, claims: bool = True) -> None:
        """claims=False: a process that only records instances (a receiver), no heartbeat."""
        self.settings = settings
        self.node = settings.node
        self.round_trips = 0  # statements sent, for bench/scale.py
        self._counter_lock = threading.Lock()
        self.pool = ConnectionPool(
            settings.dsn,
            min_size=1,
            max_size=settings.pool_size,
            kwargs={"autocommit": True},
            configure=self._configure,
            name=f"dicom-node-{settings.node}",
            open=False,
        )
        self.pool.open(wait=True, timeout=30.0)
        try:
            with self.pool.connection() as connection:
                refuse_unsafe_server(connection)
                apply_migrations(connection)
        except BaseException:
            self.pool.close()
            raise
        self._stopping = threading.Event()
        self._heartbeat: threading.Thread | None = None
        if claims:
            self.heartbeat()
            self._heartbeat = threading.Thread(
                target=self._beat, name="queue-heartbeat", daemon=True
            )
            self._heartbeat.start()

    def _configure(self, connection: psycopg.Connection[Any]) -> None:
        """Settings of every pooled connection that the server-side functions read."""
        connection.execute(
            "SELECT set_config('dicom_node.node', %s, false),"
            " set_config('dicom_node.keep_finished', %s, false)",
            (self.node, "on" if self.settings.keep_finished else "off"),
        )

    def close(self) -> None:
        self._stopping.set()
        if self._heartbeat is not None:
            self._heartbeat.join(10)
        self.pool.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as connection:
            yield connection

    def execute(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One statement in its own transaction (autocommit): durable when it returns."""
        return self._retrying(lambda: self._fetch(query, params))

    def _fetch(self, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        self.count_round_trips(1)
        with self.connection() as connection:
            cursor = connection.execute(query, params)  # type: ignore[call-overload]
            return cursor.fetchall() if cursor.description is not None else []

    def rowcount(self, query: str, params: Sequence[Any] = ()) -> int:
        def run() -> int:
            self.count_round_trips(1)
            with self.connection() as connection:
                return int(connection.execute(query, params).rowcount)  # type: ignore[call-overload]

        return self._retrying(run)

    def in_transaction(self, work: Callable[[psycopg.Connection[Any]], T], statements: int) -> T:
        """Several statements in one transaction (statements: how many, for the count)."""

        def run() -> T:
            self.count_round_trips(statements + 2)  # BEGIN and COMMIT too
            with self.connection() as connection, connection.transaction():
                return work(connection)

        return self._retrying(run)

    def count_round_trips(self, count: int) -> None:
        with self._counter_lock:
            self.round_trips += count

    def _retrying(self, run: Callable[[], T]) -> T:
        for attempt in range(5):
            try:
                return run()
            except RETRYABLE as exc:
                log.warning("queue statement retried (attempt %d): %s", attempt + 1, exc)
                time.sleep(0.01 * (attempt + 1))
        return run()

    def heartbeat(self) -> int:
        """Renew this node's leases and return expired ones (any node's) to the queue."""
        (expired,) = self.execute(
            "SELECT dn_heartbeat(%s, %s, %s)",
            (self.node, time.time(), self.settings.lease),
        )[0]
        if expired:
            log.warning(
                "%d jobs went back to the queue: the node that claimed them stopped renewing"
                " its lease (%.0f s) and is presumed dead",
                expired,
                self.settings.lease,
            )
        return int(expired)

    def _beat(self) -> None:
        while not self._stopping.wait(self.settings.lease / 3):
            try:
                self.heartbeat()
            except psycopg.Error as exc:
                # The server is away: our leases may expire meanwhile; jobs then just run again.
                log.error("queue heartbeat failed: %s", exc)


def refuse_unsafe_server(connection: psycopg.Connection[Any]) -> None:
    """A commit must be on disk before the node answers 0x0000: fsync and synchronous_commit."""
    for setting, unsafe in (("fsync", ("off",)), ("synchronous_commit", ("off",))):
        value = connection.execute(f"SHOW {setting}").fetchone()
        if value is not None and value[0] in unsafe:
            raise UnsafeServer(
                f"PostgreSQL has {setting} = {value[0]}: an acknowledged instance could be lost"
                f" in a crash; set it on for the node's database or role"
            )


def apply_migrations(connection: psycopg.Connection[Any]) -> list[str]:
    """Apply the migrations the database lacks, once even if several nodes start together."""
    applied: list[str] = []
    with connection.transaction():
        # One lock per schema: nodes starting at once wait here, then find the work done.
        connection.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema()), 18)")
        connection.execute(MIGRATIONS_TABLE)
        done = {row[0] for row in connection.execute("SELECT id FROM schema_migrations")}
        for migration_id, description, sql in all_migrations():
            if migration_id in done:
                continue
            connection.execute(sql)  # type: ignore[call-overload]
            connection.execute(
                "INSERT INTO schema_migrations (id, description) VALUES (%s, %s)",
                (migration_id, description),
            )
            applied.append(migration_id)
    if applied:
        log.info("queue database migrated: %s", ", ".join(applied))
    return applied


RECORD_SQL = """
WITH instance AS (
    INSERT INTO instances (sop_instance_uid, sop_class_uid, transfer_syntax, calling_ae_title,
        called_ae_title, spool_path, size, received_at, node, header_values)
    VALUES (%(uid)s, %(class)s, %(syntax)s, %(calling)s, %(called)s, %(spool)s, %(size)s,
        %(now)s, %(node)s, %(header_values)s)
    RETURNING id
), new_jobs AS (
    INSERT INTO jobs (instance_id, kind, target, state, next_attempt_at, created_at, updated_at,
        node)
    SELECT instance.id, spec.kind, spec.target, 'pending', %(now)s, %(now)s, %(now)s, %(node)s
    FROM instance, unnest(%(kinds)s::text[], %(targets)s::text[]) AS spec (kind, target)
)
SELECT id FROM instance
"""

CLAIM_SQL = f"""
WITH picked AS (
    SELECT id FROM jobs
    WHERE state = 'pending' AND kind = %(kind)s AND next_attempt_at <= %(now)s
        AND (%(target)s::text IS NULL OR target = %(target)s)
        AND (%(owner)s::text IS NULL OR node = %(owner)s)
    ORDER BY next_attempt_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE jobs SET state = 'running', attempts = jobs.attempts + 1, updated_at = %(now)s,
        claimed_by = %(node)s, lease_until = %(lease_until)s
    FROM picked WHERE jobs.id = picked.id
    RETURNING jobs.*
)
SELECT {JOB_COLUMNS} FROM claimed AS jobs JOIN instances ON instances.id = jobs.instance_id
ORDER BY jobs.next_attempt_at, jobs.id
"""


def _header_values_json(instance: ReceivedInstance) -> str:
    """The header values intake read, as the JSON object SQLite stores too ('' for none).

    Read with getattr: ReceivedInstance gains header_values with the store's header cache;
    before that there are none."""
    values = getattr(instance, "header_values", ())
    return json.dumps(dict(values)) if values else ""


class PostgresJobQueue:
    """node.jobs.interface.JobQueue on PostgreSQL. Safe to share between threads."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database
        self.node = database.node
        self.groups = PostgresGroups(database)

    @classmethod
    def open(cls, settings: PostgresSettings, *, claims: bool = True) -> PostgresJobQueue:
        """A job queue on its own pool (close() closes it)."""
        return cls(PostgresDatabase(settings, claims=claims))

    def close(self) -> None:
        self.database.close()

    @property
    def _owner(self) -> str | None:
        """Whose jobs this node may run: its own, or anyone's with a shared spool."""
        return None if self.database.settings.shared_spool else self.node

    # Intake.

    def record_instance(self, instance: ReceivedInstance, jobs: Sequence[JobSpec]) -> int:
        """Record a spooled instance and its jobs in one durable commit; return the instance id.

        One statement; with jobs of a series or study group, one transaction that also
        records their membership."""
        try:
            return self._record(instance, jobs)
        except psycopg.OperationalError:
            # The connection broke: the commit may have happened with its answer lost. The
            # caller deletes the spool file on an error, so say so only if nothing is there.
            found = self._recorded_id(instance)
            if found is None:
                raise
            log.warning(
                "SOP Instance UID %s: the queue's answer was lost but its commit is there",
                instance.sop_instance_uid,
            )
            return found

    def _recorded_id(self, instance: ReceivedInstance) -> int | None:
        rows = self.database.execute(
            "SELECT id FROM instances WHERE node = %s AND spool_path = %s",
            (self.node, str(instance.spool_path)),
        )
        return int(rows[0][0]) if rows else None

    def _record(self, instance: ReceivedInstance, jobs: Sequence[JobSpec]) -> int:
        now = time.time()
        plain = [job for job in jobs if job.group is None]
        grouped = [job for job in jobs if job.group is not None]
        params = self._record_params(instance, plain, now)
        if not grouped:
            return int(self.database.execute(RECORD_SQL, params)[0][0])  # type: ignore[arg-type]

        def work(connection: psycopg.Connection[Any]) -> int:
            row = connection.execute(RECORD_SQL, params).fetchone()  # type: ignore[arg-type]
            assert row is not None
            join_groups(
                connection, self.database, int(row[0]), grouped, instance.sop_instance_uid, now
            )
            return int(row[0])

        return self.database.in_transaction(work, statements=1)

    def _record_params(
        self, instance: ReceivedInstance, jobs: Sequence[JobSpec], now: float
    ) -> dict[str, Any]:
        return {
            "uid": instance.sop_instance_uid,
            "class": instance.sop_class_uid,
            "syntax": instance.transfer_syntax,
            "calling": instance.calling_ae_title,
            "called": instance.called_ae_title,
            "spool": str(instance.spool_path),
            "size": instance.size,
            "now": now,
            "node": self.node,
            "kinds": [str(job.kind) for job in jobs],
            "targets": [job.target for job in jobs],
            "header_values": _header_values_json(instance),
        }

    def spool_paths(self) -> set[Path]:
        """The spool files of every instance this node recorded (its spool holds them)."""
        rows = self.database.execute(
            "SELECT spool_path FROM instances WHERE node = %s", (self.node,)
        )
        return {Path(row[0]) for row in rows}

    # The job lifecycle.

    def requeue_running(self) -> int:
        """After a crash or restart, this node's jobs that were in flight are pending again
        (members of a dispatched group: WAITING for their group's claim again)."""

        def work(connection: psycopg.Connection[Any]) -> int:
            now = time.time()
            requeue_group_members(connection, self.node, now)
            return int(
                connection.execute(
                    "UPDATE jobs SET state = 'pending', claimed_by = NULL, lease_until = NULL,"
                    " updated_at = %s WHERE state = 'running' AND claimed_by = %s",
                    (now, self.node),
                ).rowcount
            )

        return self.database.in_transaction(work, statements=2)

    def claim(self, kind: JobKind, *, target: str | None = None, limit: int = 16) -> list[Job]:
        """Mark up to `limit` due jobs as running (leased to this node) and return them."""
        now = time.time()
        rows = self.database.execute(
            CLAIM_SQL,
            {  # type: ignore[arg-type]
                "kind": str(kind),
                "now": now,
                "target": target,
                "owner": self._owner,
                "limit": limit,
                "node": self.node,
                "lease_until": now + self.database.settings.lease,
            },
        )
        # rows.job_from_row is typed for sqlite3.Row; a psycopg tuple indexes the same.
        return [job_from_row(row) for row in cast("list[Any]", rows)]

    def release(self, jobs: Sequence[Job]) -> None:
        """Give back claimed jobs that were not tried: pending, attempt count as before."""
        if not jobs:
            return
        self.database.execute(
            "UPDATE jobs SET state = 'pending', attempts = attempts - 1, claimed_by = NULL,"
            " lease_until = NULL WHERE id = ANY(%s) AND state = 'running'",
            ([job.id for job in jobs],),
        )

    def next_due_in(self, kind: JobKind, target: str | None = None) -> float | None:
        rows = self.database.execute(
            "SELECT MIN(next_attempt_at) FROM jobs WHERE state = 'pending' AND kind = %s"
            " AND (%s::text IS NULL OR target = %s) AND (%s::text IS NULL OR node = %s)",
            (str(kind), target, target, self._owner, self._owner),
        )
        due = rows[0][0]
        return None if due is None else max(0.0, float(due) - time.time())

    def complete(self, job: Job, result: str) -> Path | None:
        """Mark a job done. Returns the spool path once every job of its instance is done."""
        ((open_jobs,),) = self.database.execute(
            "SELECT dn_complete_job(%s, %s, %s)", (job.id, result, time.time())
        )
        return None if open_jobs else job.instance.spool_path

    def complete_many(self, done: Sequence[tuple[Job, str]]) -> list[Path]:
        """complete() for several jobs in one durable transaction, in instance order (two
        nodes completing overlapping batches then lock instances in the same order)."""
        ordered = sorted(done, key=lambda item: (item[0].instance_id, item[0].id))
        if not ordered:
            return []

        def work(connection: psycopg.Connection[Any]) -> list[Path]:
            now = time.time()
            finished = []
            with connection.cursor() as cursor:
                for job, result in ordered:
                    cursor.execute("SELECT dn_complete_job(%s, %s, %s)", (job.id, result, now))
                    row = cursor.fetchone()
                    if row is not None and not row[0]:
                        finished.append(job.instance.spool_path)
            return finished

        return self.database.in_transaction(work, statements=len(ordered))

    def complete_stored(self, job: Job, path: Path, transfer_syntax: str) -> Path | None:
        """complete() for a store job, recording where the instance is in the same commit."""
        ((open_jobs,),) = self.database.execute(
            "SELECT dn_complete_stored(%s, %s, %s, %s, %s, %s)",
            (
                job.id,
                job.target,
                job.instance.sop_instance_uid,
                str(path),
                transfer_syntax,
                time.time(),
            ),
        )
        return None if open_jobs else job.instance.spool_path

    def complete_stored_many(self, done: Sequence[tuple[Job, Path, str]]) -> list[Path]:
        """complete_stored() for several store jobs in one durable transaction, in instance
        order. Returns the spool paths of finished instances."""
        ordered = sorted(done, key=lambda item: (item[0].instance_id, item[0].id))
        if not ordered:
            return []

        def work(connection: psycopg.Connection[Any]) -> list[Path]:
            now = time.time()
            finished = []
            with connection.cursor() as cursor:
                for job, path, syntax in ordered:
                    cursor.execute(
                        "SELECT dn_complete_stored(%s, %s, %s, %s, %s, %s)",
                        (job.id, job.target, job.instance.sop_instance_uid, str(path), syntax, now),
                    )
                    row = cursor.fetchone()
                    if row is not None and not row[0]:
                        finished.append(job.instance.spool_path)
            return finished

        return self.database.in_transaction(work, statements=len(ordered))

    def retry_later(self, job: Job, error: str, delay: float) -> None:
        now = time.time()
        self.database.execute(
            "UPDATE jobs SET state = 'pending', last_error = %s, next_attempt_at = %s,"
            " updated_at = %s, claimed_by = NULL, lease_until = NULL WHERE id = %s",
            (error, now + delay, now, job.id),
        )

    def dead_letter(self, job: Job, error: str) -> None:
        self.database.execute(
            "UPDATE jobs SET state = 'failed', last_error = %s, updated_at = %s,"
            " claimed_by = NULL, lease_until = NULL WHERE id = %s",
            (error, time.time(), job.id),
        )

    # Targets: the ones gone from the config, and holds on unreachable destinations.

    def open_targets(self, kind: JobKind) -> list[str]:
        """Targets of this kind with pending or running jobs this node may run (during a
        rolling config change another node may still have a target this one lacks)."""
        rows = self.database.execute(
            "SELECT DISTINCT target FROM jobs WHERE kind = %s"
            " AND state IN ('pending', 'running', 'waiting')"
            " AND (%s::text IS NULL OR node = %s)",
            (str(kind), self._owner, self._owner),
        )
        return [row[0] for row in rows]

    def dead_letter_target(self, kind: JobKind, target: str, error: str) -> int:
        """Dead-letter the pending or running jobs of a target (gone from this node's config)."""
        return self.database.rowcount(
            "UPDATE jobs SET state = 'failed', last_error = %s, updated_at = %s,"
            " claimed_by = NULL, lease_until = NULL"
            " WHERE kind = %s AND target = %s AND state IN ('pending', 'running', 'waiting')"
            " AND (%s::text IS NULL OR node = %s)",
            (error, time.time(), str(kind), target, self._owner, self._owner),
        )

    def defer_target(
        self, kind: JobKind, target: str, until: float, *, new_only: bool = False
    ) -> None:
        """Hold a target's pending jobs until `until`, on every node: the peer is unreachable
        for all of them."""
        only_new = " AND updated_at = created_at" if new_only else ""
        self.database.execute(
            "UPDATE jobs SET next_attempt_at = %s, updated_at = %s"
            " WHERE kind = %s AND target = %s AND state = 'pending' AND next_attempt_at < %s"
            + only_new,
            (until, time.time(), str(kind), target, until),
        )

    def made_due_since(self, kind: JobKind, target: str, since: float) -> bool:
        """Whether a job that existed at `since` was made due after it (`queue retry`, from
        any node)."""
        rows = self.database.execute(
            "SELECT 1 FROM jobs WHERE kind = %s AND target = %s AND state = 'pending'"
            " AND next_attempt_at <= %s AND updated_at > %s AND created_at <= %s LIMIT 1",
            (str(kind), target, time.time(), since, since),
        )
        return bool(rows)

    # Series and study groups (node.jobs.postgres_groups), shared by the cluster.

    def waiting_groups(self) -> list[GroupReport]:
        return self.groups.waiting_groups()

    def dispatch_group(self, group_id: int, reason: str, *, if_members: int | None = None) -> bool:
        return self.groups.dispatch_group(group_id, reason, if_members=if_members)

    def claim_group(self, kind: JobKind, target: str) -> GroupClaim | None:
        return self.groups.claim_group(kind, target)

    def return_to_group(self, jobs: Sequence[Job], error: str | None = None) -> None:
        self.groups.return_to_group(jobs, error)

    def settle_groups(self) -> list[GroupReport]:
        return self.groups.settle_groups()

    # The stored index, shared by the cluster.

    def stored_path(self, storage: str, sop_instance_uid: str) -> Path | None:
        rows = self.database.execute(
            "SELECT path FROM stored WHERE storage = %s AND sop_instance_uid = %s",
            (storage, sop_instance_uid),
        )
        return Path(rows[0][0]) if rows else None

    def is_known(self, storage: str, sop_instance_uid: str) -> bool:
        """Whether the SOP Instance UID is stored in, or on its way to, a storage target."""
        rows = self.database.execute(
            "SELECT 1 FROM stored WHERE storage = %s AND sop_instance_uid = %s"
            " UNION ALL SELECT 1 FROM jobs JOIN instances ON instances.id = jobs.instance_id"
            " WHERE jobs.kind = 'store' AND jobs.target = %s AND jobs.state IN"
            " ('pending', 'running', 'waiting') AND instances.sop_instance_uid = %s LIMIT 1",
            (storage, sop_instance_uid, storage, sop_instance_uid),
        )
        return bool(rows)
