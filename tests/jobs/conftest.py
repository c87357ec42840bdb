"""The queue tests run on both backends: `queue_backend` is SQLite, then PostgreSQL.

PostgreSQL is the session's one real server (tests/postgres.py), each test in a schema
of its own. A missing PostgreSQL skips the postgresql half on a developer's machine and
fails it with CI=true.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from node.jobs.backends import OpenQueue, QueueSettings, open_queue
from node.jobs.interface import JobQueue, QueueOperations

BACKENDS = ("sqlite", "postgresql")


@dataclass
class QueueBackend:
    """One backend under test: the node's queue and reports, and raw SQL for the asserts."""

    name: str
    settings: QueueSettings
    opened: OpenQueue
    others: list[OpenQueue] = field(default_factory=list)

    @property
    def queue(self) -> JobQueue:
        return self.opened.queue

    @property
    def reports(self) -> QueueOperations:
        return self.opened.reports

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """A read-only query in SQL both backends speak (no parameters)."""
        database: Any = getattr(self.queue, "database")  # noqa: B009
        if self.name == "sqlite":
            with database.read() as db:
                return [tuple(row) for row in db.execute(sql).fetchall()]
        return [tuple(row) for row in database.execute(sql)]

    def another_node(self, name: str, **changes: Any) -> OpenQueue:
        """A second node on the same queue database (PostgreSQL only: SQLite has one node)."""
        assert self.name == "postgresql", "a SQLite queue belongs to one node"
        settings = QueueSettings(**{**self.settings.__dict__, "node": name, **changes})
        opened = open_queue(settings)
        self.others.append(opened)
        return opened

    def hold_writer(self) -> Callable[[], contextlib.AbstractContextManager[None]]:
        """A write transaction held open on the jobs table (what a commit in flight does)."""

        @contextlib.contextmanager
        def held() -> Iterator[None]:
            database: Any = getattr(self.queue, "database")  # noqa: B009
            if self.name == "sqlite":
                with database.transaction() as db:
                    db.execute("UPDATE jobs SET last_error = 'not committed yet'")
                    yield
            else:
                with database.connection() as connection, connection.transaction():
                    connection.execute("UPDATE jobs SET last_error = 'not committed yet'")
                    yield

        return held


def backend_settings(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> QueueSettings:
    sqlite_path = tmp_path / "data" / "queue.sqlite3"
    if name == "sqlite":
        return QueueSettings("sqlite", sqlite_path, node="node-a")
    dsn: str = request.getfixturevalue("postgres_dsn")
    dsn_file = tmp_path / "pg.dsn"
    dsn_file.write_text(dsn)
    return QueueSettings("postgresql", sqlite_path, node="node-a", dsn_file=dsn_file, lease=30.0)


@pytest.fixture(params=BACKENDS)
def queue_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueBackend]:
    settings = backend_settings(request.param, tmp_path, request)
    backend = QueueBackend(request.param, settings, open_queue(settings))
    yield backend
    for other in backend.others:
        other.close()
    backend.opened.close()


def run_in_thread(work: Callable[[], object], timeout: float) -> tuple[bool, object]:
    """(finished within timeout, value) of work run in a thread."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    thread.join(timeout)
    return (not thread.is_alive(), result[0] if result else None)
