"""`dicom-node check-config` prints the effective config as TOML that loads back to the same Config."""

from __future__ import annotations

import tomllib
from pathlib import Path

from node.config.model import load_config, parse_config
from tests.support import dicom_node

CONFIG = """
[node]
port = 11190
[[storage]]
name = "archive"
path = "./archive"
transfer_syntax = ["HTJ2KLossless", {syntax = "JPEGLSNearLossless", near = 3}]
allow_lossy = true
[[destination]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
transfer_syntaxes = ["JPEG2000Lossless"]
[[route]]
match = { Modality = "CT", CallingAETitle = "CT*" }
storage = ["archive"]
destinations = ["pacs"]
"""


def test_effective_config_round_trips(tmp_path: Path) -> None:
    source = tmp_path / "config.toml"
    source.write_text(CONFIG)
    result = dicom_node("check-config", "-c", str(source))
    assert result.returncode == 0, result.stderr
    printed = result.stdout
    assert (
        'transfer_syntax = ["HTJ2KLossless", { syntax = "JPEGLSNearLossless", near = 3 }]'
        in printed
    )
    assert 'transfer_syntaxes = ["JPEG2000Lossless"]' in printed
    reparsed = parse_config(tomllib.loads(printed), source)
    assert reparsed == load_config(source)
