"""The benchmark's smoke mode runs end to end, so bench/ cannot rot unnoticed."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO, require_tool


def test_bench_smoke_prints_every_section() -> None:
    require_tool("storescp")
    require_tool("Orthanc")
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    for prefix in (
        "| ingest | storescp | 1 | CT",
        "| ingest | Orthanc | 4 | CT",
        "| ingest | node | 4 | CT",
        "| transcode | Orthanc JPEG-LS | 4 | CT",
        "| transcode | node JPEG-LS | 4 | CT",
        "| transcode | node HTJ2K | 4 | CT",
        "| forward | node->storescp | 1 | CT",
        "| forward | node->Orthanc STOW-RS | 1 | CT",
        "| resources node | 1 | multi-frame",
    ):
        assert any(row.startswith(prefix) for row in rows), f"no row {prefix!r} in:\n{done.stdout}"
    ingest = next(row for row in rows if row.startswith("| ingest | node | 1 | CT"))
    inst_per_s = float(ingest.split("|")[5])
    assert inst_per_s > 0, ingest
