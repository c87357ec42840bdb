"""A real PostgreSQL for tests: `initdb` into a temporary folder, `postgres` on a loopback port.

One server per test session (the `postgres_server` fixture, made available to every test
by tests/conftest.py); each test gets a schema of its own (`postgres_dsn`), which is much
cheaper than a database. The binaries are Debian's (`postgresql`: /usr/lib/postgresql/N/bin,
or initdb/pg_ctl on PATH). PostgreSQL refuses to run as root, so under root (CI) the data
folder belongs to the `postgres` user and the server runs as that user. Stopped by PID.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import ServerProcess, free_port, listening
from tests.tools import DEBIAN_PACKAGES, missing_tool

SUPERUSER = "dicomnode"


def find_postgres_bin() -> Path:
    """The folder of initdb and postgres: PATH first, then Debian's versioned folders."""
    on_path = shutil.which("initdb")
    if on_path and (Path(on_path).resolve().parent / "postgres").exists():
        return Path(on_path).resolve().parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not versions:
        missing_tool(
            f"PostgreSQL (initdb, postgres) is not installed (apt-get install {DEBIAN_PACKAGES})"
        )
    return Path(versions[-1]).parent


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) of the `postgres` user when we are root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        missing_tool("running as root needs the postgres user (apt-get install postgresql)")
    return entry.pw_uid, entry.pw_gid


class PostgresServer(ServerProcess):
    """`postgres -D DATA` on 127.0.0.1:port with fsync and synchronous_commit on (the defaults:
    the node refuses a server without them)."""

    label = "PostgreSQL"
    start_timeout = 60.0

    def __init__(self) -> None:
        self.bin = find_postgres_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.user = _run_as()
        if self.user is not None:
            os.chown(self.folder, *self.user)
        super().__init__(free_port(), self.folder / "postgres.log", cwd=None)
        self.data = self.folder / "data"
        self._initdb()

    def _initdb(self) -> None:
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--no-sync",  # the test cluster's catalogue; the tests' own commits are fsynced
                "-E",
                "UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            timeout=120,
            **self._as_user(),
        )

    def _as_user(self) -> dict[str, int]:
        return {} if self.user is None else {"user": self.user[0], "group": self.user[1]}

    def start(self, wait: bool = True) -> PostgresServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            **self._as_user(),  # type: ignore[arg-type]
        )
        if wait:
            self.wait_ready()
        return self

    def command(self) -> list[str]:
        return [
            str(self.bin / "postgres"),
            "-D",
            str(self.data),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-k",
            str(self.folder),
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=32MB",
            "-c",
            "log_min_messages=warning",
        ]

    def ready(self) -> bool:
        if not listening(self.port):
            return False
        import psycopg

        try:
            with psycopg.connect(self.dsn(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def dsn(self, schema: str = "") -> str:
        options = f" options='-csearch_path={schema}'" if schema else ""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres{options}"

    def new_schema(self) -> str:
        """A fresh, empty schema; its DSN puts it first on the search path."""
        import psycopg

        schema = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {schema}")
        return self.dsn(schema)

    def stop(self, timeout: float | None = None) -> int:
        """Fast shutdown (SIGINT): SIGTERM's smart shutdown would wait for idle pools."""
        try:
            if self.alive():
                self.signal(signal.SIGINT)
            return super().stop(timeout)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL for the whole session (missing binaries: skip, or fail with CI=true)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing_tool("psycopg is not installed (it is in the test extras)")
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A libpq connection string to a schema of this test's own."""
    return postgres_server.new_schema()
