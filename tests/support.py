"""Shared test helpers: run the real node as a subprocess, find free ports, call DCMTK tools."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.tools import require_tool

REPO = Path(__file__).resolve().parent.parent

# The core end-to-end tests run against both acceptors (node.acceptor): our own
# Upper Layer, and pynetdicom's as the reference. Parametrizes conftest's `acceptor`.
ACCEPTORS = ("native", "pynetdicom")
BOTH_ACCEPTORS = pytest.mark.parametrize("acceptor", ACCEPTORS, indirect=True)


def dicom_node(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the dicom-node CLI (`python -m node ARGS`) from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "node", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


# Ports for servers the tests start come from below the kernel's ephemeral range
# (32768-60999): a port taken from that range with bind(0) can be handed to the
# local end of an outgoing connection (storescu, a forwarding SCU) before the
# server that was meant to listen on it has bound it. Each port is given out once.
_TEST_PORTS = range(20000, 32768)
_given_ports: set[int] = set()
_next_port = [_TEST_PORTS.start + (os.getpid() * 97) % len(_TEST_PORTS)]


def free_port() -> int:
    for _ in range(len(_TEST_PORTS)):
        port = _next_port[0]
        _next_port[0] = port + 1 if port + 1 < _TEST_PORTS.stop else _TEST_PORTS.start
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


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def write_config(path: Path, sections: dict[str, object]) -> Path:
    """Write a TOML config. Values that are lists of dicts become arrays of tables."""
    lines: list[str] = []
    for name, body in sections.items():
        tables = body if isinstance(body, list) else [body]
        for table in tables:
            assert isinstance(table, dict)
            lines.append(f"[[{name}]]" if isinstance(body, list) else f"[{name}]")
            subtables = {k: v for k, v in table.items() if isinstance(v, dict) and k != "match"}
            for key, value in table.items():
                if key not in subtables:
                    lines.append(f"{key} = {toml_value(value)}")
            for key, value in subtables.items():
                lines.append(f"[{name}.{key}]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in value.items())
            lines.append("")
    path.write_text("\n".join(lines))
    return path


def base_config(tmp: Path, port: int, **node: object) -> dict[str, object]:
    """A minimal working config rooted in tmp: one storage 'archive', no disk headroom limit."""
    return {
        "node": {
            "ae_title": "DICOMNODE",
            "host": "127.0.0.1",
            "port": port,
            "data_dir": str(tmp / "data"),
            **node,
        },
        "limits": {"min_free_space": 0},
        "storage": [{"name": "archive", "path": str(tmp / "archive")}],
    }


class NodeProcess:
    """The node as a real subprocess (`python -m node run -c CONFIG`)."""

    def __init__(self, config_path: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.log_path = config_path.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> NodeProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node", "run", "-c", str(self.config_path)],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            try:
                wait_for_port(self.port)
            except TimeoutError:
                self.kill()
                raise AssertionError(f"node did not start; log:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return 0
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.alive():
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill() if exc[0] else self.stop()


def storescu(
    port: int,
    files: Sequence[Path],
    *args: str,
    aec: str = "DICOMNODE",
    aet: str = "STORESCU",
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK storescu against 127.0.0.1:port. Returns the completed process (check .returncode)."""
    exe = require_tool("storescu")
    return subprocess.run(
        [exe, "-aec", aec, "-aet", aet, *args, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
