"""Shared test helpers: run the real node as a subprocess, find free ports, call DCMTK tools."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

# free_port and wait_for_port are re-exported: the tests import them from here.
from tests.processes import NODELAY, REPO, ServerProcess
from tests.processes import free_port as free_port
from tests.processes import wait_for_port as wait_for_port
from tests.tools import require_tool

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


# The node logs journald-style when JOURNAL_STREAM is set (as under systemd); tests read
# terminal lines ("time LEVEL logger: message") unless they pass env={"JOURNAL_STREAM": ...}.
TERMINAL_LOG: dict[str, str | None] = {"JOURNAL_STREAM": None}


def configured_node(
    folder: Path,
    edit: Callable[[dict[str, object]], None] | None = None,
    *,
    env: Mapping[str, str | None] | None = None,
    stored_as: str | None = None,
    config: dict[str, object] | None = None,
    **node: object,
) -> NodeProcess:
    """A node (not started) on a config written into `folder`: base_config's sections with
    `node` keys in [node], then `edit` changes any section. `env` changes the node's
    environment (None removes a variable); `stored_as` makes the storage transcode to that
    syntax, in codec worker processes; `config` is a whole config the test built (from
    base_config, on a port it chose), used instead of a fresh base_config."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is None:
        sections = base_config(folder, free_port(), **node)
    else:
        sections = {**config, "node": {**config["node"], **node}}  # type: ignore[dict-item]
    port = int(sections["node"]["port"])  # type: ignore[index]
    if stored_as:
        sections["storage"] = [
            {"name": "archive", "path": str(folder / "archive"), "transfer_syntax": stored_as}
        ]
    if edit is not None:
        edit(sections)
    config_path = write_config(folder / f"config-{port}.toml", sections)
    return NodeProcess(config_path, port, env={**TERMINAL_LOG, **(env or {})})


class NodeProcess(ServerProcess):
    """The node as a real subprocess (`python -m node run -c CONFIG`); its log beside the config.

    `env` changes the inherited environment; a None value removes a variable (for example
    JOURNAL_STREAM, for terminal-style log lines).
    """

    label = "node"
    stop_timeout = 30.0
    must_stop_on_sigterm = True

    def __init__(
        self, config_path: Path, port: int, env: Mapping[str, str | None] | None = None
    ) -> None:
        super().__init__(port, config_path.with_suffix(".log"), env=env)
        self.config_path = config_path

    def command(self) -> list[str]:
        return [sys.executable, "-m", "node", "run", "-c", str(self.config_path)]

    def start(self, wait: bool = True) -> NodeProcess:
        super().start(wait)
        return self

    def __enter__(self) -> NodeProcess:
        return self.start()


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
        env={**os.environ, **NODELAY},
    )


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
