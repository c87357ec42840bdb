"""Shared fixtures: nodes started as real subprocesses and always stopped by their PID."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.support import NodeProcess, base_config, free_port, write_config

# Builds a config (sections as in tests.support.base_config, then edited by the
# caller) and starts a node on it; the node is killed at teardown if still alive.
StartNode = Callable[..., NodeProcess]

# The node logs journald-style when JOURNAL_STREAM is set (as under systemd); tests read
# terminal lines ("time LEVEL logger: message") unless they pass env={"JOURNAL_STREAM": ...}.
TERMINAL_LOG: dict[str, str | None] = {"JOURNAL_STREAM": None}


@pytest.fixture
def acceptor(request: pytest.FixtureRequest) -> str:
    """node.acceptor for start_node: "native" unless a test is marked BOTH_ACCEPTORS."""
    return str(getattr(request, "param", "native"))


@pytest.fixture
def start_node(tmp_path: Path, acceptor: str) -> Iterator[StartNode]:
    started: list[NodeProcess] = []
    chosen = {} if acceptor == "native" else {"acceptor": acceptor}

    def start(
        edit: Callable[[dict[str, object]], None] | None = None,
        *,
        root: Path | None = None,
        wait: bool = True,
        env: Mapping[str, str | None] | None = None,
        stored_as: str | None = None,
        config: dict[str, object] | None = None,
        **node: object,
    ) -> NodeProcess:
        """`node` keys go to [node]; `edit` changes any section; `env` the node's environment
        (None removes a variable); `stored_as` makes the storage transcode to that syntax,
        in codec worker processes. `config`: sections the test built whole (from
        base_config, on a port it chose), used instead of a fresh base_config."""
        folder = root or tmp_path
        if config is None:
            sections = base_config(folder, free_port(), **{**chosen, **node})
        else:
            sections = {**config, "node": {**config["node"], **chosen, **node}}  # type: ignore[dict-item]
        port = int(sections["node"]["port"])  # type: ignore[index]
        if stored_as:
            sections["storage"] = [
                {"name": "archive", "path": str(folder / "archive"), "transfer_syntax": stored_as}
            ]
        if edit is not None:
            edit(sections)
        config_path = write_config(folder / f"config-{port}.toml", sections)
        process = NodeProcess(config_path, port, env={**TERMINAL_LOG, **(env or {})})
        started.append(process)
        return process.start(wait=wait)

    yield start
    for process in started:
        process.kill()
