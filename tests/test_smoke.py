"""The node starts from a config, answers C-ECHO, stores a C-STORE and stops cleanly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom

from tests.corpus import CT_SMALL
from tests.support import (
    NodeProcess,
    base_config,
    free_port,
    require_tool,
    storescu,
    wait_until,
    write_config,
)


def test_echo_store_and_clean_stop(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "config.toml", base_config(tmp_path, port))
    node = NodeProcess(config, port).start()
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
