"""A missing external program skips a test on a developer's machine and fails it in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from tests.tools import find_tool, have_tool, require_tool

MISSING = "no-such-program-dicom-node"


def test_a_missing_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING} is not installed"):
        require_tool(MISSING)
    assert have_tool(MISSING) is False


@pytest.mark.parametrize("check", [require_tool, have_tool])
def test_a_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch, check: object) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING} is not installed.*CI=true"):
        check(MISSING)  # type: ignore[operator]


def test_an_installed_tool_is_found_in_ci_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require_tool("sh") == find_tool("sh")
    assert Path(require_tool("sh")).is_file()
    assert have_tool("sh") is True


def test_a_script_in_our_virtualenv_does_not_count(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # pynetdicom's storescu in the venv must never stand in for DCMTK's.
    venv_bin = Path(sys.executable).parent
    program = tmp_path / "some-tool"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(venv_bin), str(tmp_path)]))
    assert find_tool(Path(sys.executable).name) is None
    assert find_tool("some-tool") == str(program)


def test_a_ci_run_of_pytest_fails_a_test_whose_tool_is_missing(tmp_path: Path) -> None:
    test_file = tmp_path / "test_needs_a_tool.py"
    test_file.write_text(
        "from tests.tools import require_tool\n\n\n"
        f"def test_it() -> None:\n    require_tool({MISSING!r})\n"
    )
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert "1 failed" in run.stdout, run.stdout + run.stderr
    assert run.returncode == 1, run.stdout
