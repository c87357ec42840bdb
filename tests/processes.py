"""Servers as real subprocesses, for the tests and the benchmark: start, wait until ready,
stop by PID, log to a file.

The node, DCMTK storescp, Orthanc and pynetdicom SCPs all run through `ServerProcess`.
This module imports the standard library only, so that bench/ (run without pytest, as
`python bench/run.py`) can share it with tests/ without pulling in test fixtures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent

# DCMTK and Orthanc use Nagle's algorithm unless this is in their environment, and then
# fall to about 20 instances a second whatever the size (see shared/README.md).
NODELAY = {"TCP_NODELAY": "1"}

# Ports for servers come from below the kernel's ephemeral range (32768-60999): a port
# taken from that range with bind(0) can be handed to the local end of an outgoing
# connection (storescu, a forwarding SCU) before the server that was meant to listen on
# it has bound it. Each port is given out once per process.
_SERVER_PORTS = range(20000, 32768)
_given_ports: set[int] = set()
_next_port = [_SERVER_PORTS.start + (os.getpid() * 97) % len(_SERVER_PORTS)]


def _path_without_virtualenv() -> str:
    # pynetdicom installs apps named storescu, storescp, echoscu... into the
    # virtualenv's bin; an activated venv would shadow DCMTK's programs with them.
    venv_bin = Path(sys.executable).parent.resolve()
    entries = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(e for e in entries if e and Path(e).resolve() != venv_bin)


def find_tool(name: str) -> str | None:
    """Path of an installed program, never a same-named script from our own virtualenv."""
    return shutil.which(name, path=_path_without_virtualenv())


def free_port() -> int:
    for _ in range(len(_SERVER_PORTS)):
        port = _next_port[0]
        _next_port[0] = port + 1 if port + 1 < _SERVER_PORTS.stop else _SERVER_PORTS.start
        if port in _given_ports or not _bindable(port):
            continue
        _given_ports.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def accepts_connections(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connect to the port succeeds (the peer sees a connection that closes)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def listening(port: int) -> bool:
    """Whether a socket listens on the port, read from /proc: connecting to probe would
    leave a half-open association behind that a receiver may wait for when stopping."""
    hex_port = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fp:
                next(fp)
                for line in fp:
                    fields = line.split()
                    if fields[1].endswith(hex_port) and fields[3] == "0A":  # 0A = LISTEN
                        return True
        except OSError:
            continue
    return False


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on the port (any address), from /proc/net/tcp and tcp6."""
    hex_port = f":{port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fp:
            next(fp)
            for line in fp:
                fields = line.split()
                if fields[1].endswith(hex_port) and fields[3] == "0A":
                    inodes.add(fields[9])
    return inodes


def _process_tree(pid: int) -> list[int]:
    """The process and its descendants (from /proc/PID/task/*/children)."""
    tree, index = [pid], 0
    while index < len(tree):
        tasks = f"/proc/{tree[index]}/task"
        with contextlib.suppress(OSError):
            for task in os.listdir(tasks):
                with contextlib.suppress(OSError), open(f"{tasks}/{task}/children") as fp:
                    tree.extend(int(child) for child in fp.read().split())
        index += 1
    return tree


def listens_in(pid: int, port: int) -> bool:
    """Whether the process (or one it started) holds the socket listening on the port.

    A port free when it was chosen can be taken by another test run's server before ours
    binds it (8 agents share the machine, each allocating from the same range): a connect
    test alone would then call that stranger ready, and the test would talk to it.
    """
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return False
    for member in _process_tree(pid):
        folder = f"/proc/{member}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(folder):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{folder}/{fd}") in wanted:
                        return True
    return False


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if accepts_connections(port, host):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


class NotReady(AssertionError):
    """A server exited, or was not ready in time, at start (the message holds its log)."""


class ServerProcess:
    """One server subprocess: its command, environment and log file, stopped by its PID.

    Subclasses give `command()` and may override `ready()` (default: the port accepts a
    TCP connection). The log file collects stdout and stderr across restarts.
    """

    label = "server"
    start_timeout = 20.0
    stop_timeout = 20.0
    # Whether a server that outlives SIGTERM by stop_timeout is an error (it is killed
    # first): true for the node, whose graceful stop is under test.
    must_stop_on_sigterm = False
    # A session of its own, so that stop() also kills what it forked (storescp --fork
    # children, the node's codec workers).
    own_session = False

    def __init__(
        self,
        port: int,
        log_path: Path,
        env: Mapping[str, str | None] | None = None,
        cwd: Path | None = REPO,
    ) -> None:
        self.port = port
        self.log_path = log_path
        self.env = _environment(env)
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        # Ours listening, not only someone: see listens_in.
        return listens_in(self.pid, self.port) and accepts_connections(self.port)

    def start(self, wait: bool = True) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.command()
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=self.own_session,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll ready() until it holds; a server that exits or times out is killed and raised."""
        limit = timeout if timeout is not None else self.start_timeout
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if not self.alive():
                raise NotReady(f"{self.label} exited at start; log:\n{self.log()}")
            if self.ready():
                return
            time.sleep(0.05)
        self.kill()
        raise NotReady(f"{self.label} not ready after {limit} s; log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logged(self, text: str, timeout: float = 10.0) -> bool:
        """Whether `text` is in the log, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM and wait; returns the exit code. Killed if it outlives the timeout."""
        if self.process is None:
            return 0
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout if timeout is not None else self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            if self.must_stop_on_sigterm:
                raise
            return self.process.returncode
        finally:
            self._release()

    def kill(self) -> None:
        if self.process is not None and self.alive():
            self.process.kill()
            self.process.wait(10)
        self._release()

    def _release(self) -> None:
        if self.own_session and self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill() if exc[0] else self.stop()


def _environment(changes: Mapping[str, str | None] | None) -> dict[str, str]:
    """os.environ with `changes` applied; a None value removes the variable."""
    env = dict(os.environ)
    for key, value in (changes or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env
