"""The static checks CI gates on, run by the README's single test command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO


@pytest.mark.parametrize(
    "command",
    [["mypy", "node"], ["ruff", "check", "."], ["ruff", "format", "--check", "."]],
    ids=" ".join,
)
def test_static_check_passes(command: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *command], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}{done.stderr}"
