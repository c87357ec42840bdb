"""The queue's SQLite database: connections, schema and group commit.

WAL mode with synchronous=FULL: a commit is on disk when it returns, so a
kill -9 or a power cut right after the node answers a C-STORE loses nothing.

Durable writes are shared (group commit): whoever finds no commit in flight
runs every durable write waiting so far (received instances from concurrent
associations, jobs completed by concurrent workers) in one transaction, so N
of them cost one WAL fsync, not N. Each caller still returns only after the
commit that holds its own write. Workers' bookkeeping (claiming a job,
rescheduling it) runs in transactions that are not fsynced on their own:
losing one in a power cut only makes a job run again, and the next durable
commit persists it.

Lookups use a second connection, the reader. WAL lets a reader see the last
commit while a writer holds its transaction, so a lookup never waits behind a
commit's fsync. SQLite is built serialized here (sqlite3.threadsafety == 3), so
sharing a connection between threads is safe (check_same_thread=False), but a
connection has one transaction at a time: a thread's BEGIN would take in
another's statements. Hence one lock per connection, held for a whole
transaction or lookup; the reader's lock is never held through a commit.
"""

from __future__ import annotations

import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.jobs import commitment_schema, groups

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


# Columns added to the tables above after a release, as (table, column, declaration). An
# existing database gains them at start (add_missing_columns), so upgrading a node in place needs
# no migration step. Features that need tables of their own keep their CREATE TABLE IF NOT
# EXISTS text in their own module and list it in EXTRA_SCHEMAS.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # ReceivedInstance.header_values as a JSON object (node.store reads it instead of the file).
    ("instances", "header_values", "TEXT NOT NULL DEFAULT ''"),
)
EXTRA_SCHEMAS: tuple[str, ...] = (groups.SCHEMA, commitment_schema.SCHEMA)


def add_missing_columns(
    connection: sqlite3.Connection, added: Sequence[tuple[str, str, str]]
) -> list[str]:
    """ALTER TABLE ... ADD COLUMN for each listed column the database lacks; returns those added."""
    done = []
    for table, column, declaration in added:
        present = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            done.append(f"{table}.{column}")
    return done


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


def connect_read_only(path: Path, *, timeout: float = 10.0) -> sqlite3.Connection:
    """Open the database so that nothing can be written, not even the WAL mode setting."""
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)


class ReadOnlyDatabase(Exception):
    """A write was asked of a database opened read-only (`dicom-node status`)."""


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


class Database:
    """The queue database: a writer connection with group commit and a reader connection.

    Safe to share between threads. The job queue and the reports work on one.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """read_only: only a reader that cannot write (safe next to a running node)."""
        self.path = path
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._pending: list[_PendingWrite] = []
        self._pending_lock = threading.Lock()
        self._committer = threading.Lock()  # held by the thread committing a batch
        self._writer: sqlite3.Connection | None = None
        if read_only:
            self._reader = connect_read_only(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = connect(path)
        self._reader = connect(path)
        # executescript manages its own transaction; CREATE ... IF NOT EXISTS is idempotent.
        self._writer.executescript(SCHEMA)
        for extra in EXTRA_SCHEMAS:
            self._writer.executescript(extra)
        add_missing_columns(self._writer, ADDED_COLUMNS)

    def close(self) -> None:
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
        with self._read_lock:
            self._reader.close()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The reader connection, for lookups and reports; never waits for a writer."""
        with self._read_lock:
            yield self._reader

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; durable=False skips the fsync (see the module docstring)."""
        with self._write_lock:
            db = self._writer
            if db is None:
                raise ReadOnlyDatabase(f"{self.path} is open read-only")
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

    def write_durably(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run work in a durable transaction, shared with the writes waiting beside it.

        Returns work's value once the commit that holds it is on disk.
        """
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
            with self.transaction() as db:
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
