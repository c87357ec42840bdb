"""The node starts from a config, answers C-ECHO, stores a C-STORE and stops cleanly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom

from tests.conftest import StartNode
from tests.corpus import CT_SMALL
from tests.support import (
    require_tool,
    storescu,
    wait_until,
)


def test_echo_store_and_clean_stop(start_node: StartNode, tmp_path: Path) -> None:
    node = start_node()
    port = node.port
    try:
        echo = subprocess.run(
            [require_tool("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
        )
        assert echo.returncode == 0, echo.stderr
        sent = storescu(port, [CT_SMALL])
        assert sent.returncode == 0, sent.stderr
        assert wait_until(lambda: list((tmp_path / "archive").rglob("*.dcm")), timeout=10)
        stored = list((tmp_path / "archive").rglob("*.dcm"))
        assert len(stored) == 1
        assert pydicom.dcmread(stored[0]).SOPInstanceUID == pydicom.dcmread(CT_SMALL).SOPInstanceUID
    finally:
        assert node.stop() == 0, node.log()
