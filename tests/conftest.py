"""Shared fixtures: nodes started as real subprocesses and always stopped by their PID."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import NodeProcess, configured_node

# Builds a config (sections as in tests.support.base_config, then edited by the
# caller) and starts a node on it; the node is killed at teardown if still alive.
# The arguments are tests.support.configured_node's, plus wait (for the port).
StartNode = Callable[..., NodeProcess]


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
        **options: Any,
    ) -> NodeProcess:
        process = configured_node(root or tmp_path, edit, **{**chosen, **options})
        started.append(process)
        return process.start(wait=wait)

    yield start
    for process in started:
        process.kill()


# One PostgreSQL per session for the tests that use it (the queue on both backends, the
# cluster tests), and a schema of its own per test.
from tests.postgres import postgres_dsn, postgres_server  # noqa: E402, F401
from tests.seaweed import bucket, seaweed  # noqa: E402, F401
