"""`dicom-node check-config`: a broken config exits 2 and names the file and the dotted key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import REPO, base_config, dicom_node, write_config

CONFIG_ERROR = 2


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return dicom_node("check-config", "-c", str(path), timeout=60)


def set_key(sections: dict[str, object], dotted: str, value: object) -> None:
    """Set e.g. 'node.port' or 'storage.0.layout' in a base_config dict."""
    *parents, last = dotted.split(".")
    target: object = sections
    for part in parents:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})  # type: ignore[index,union-attr]
    target[last] = value  # type: ignore[index]


BROKEN = {
    "unknown key": ("node.colour", "blue", "node.colour"),
    "unknown section key": ("security.allowed_aets", ["A"], "security.allowed_aets"),
    "port out of range": ("node.port", 70000, "node.port"),
    "port is text": ("node.port", "11112", "node.port"),
    "boolean as number": ("node.max_associations", True, "node.max_associations"),
    "AE title too long": ("node.ae_title", "A" * 17, "node.ae_title"),
    "bad syntax name": (
        "accept.transfer_syntaxes",
        ["JPEGLSLossles"],
        "accept.transfer_syntaxes",
    ),
    "bad syntax UID": ("accept.transfer_syntaxes", ["1.2.3.4"], "accept.transfer_syntaxes"),
    "bad layout keyword": (
        "storage.0.layout",
        "{PatientId}/{SOPInstanceUID}.dcm",
        "storage[0].layout",
    ),
    "layout escapes": ("storage.0.layout", "../{SOPInstanceUID}.dcm", "storage[0].layout"),
    "bad duplicates policy": ("storage.0.duplicates", "replace", "storage[0].duplicates"),
    "negative limit": ("limits.min_free_space", -1, "limits.min_free_space"),
    "tiny max_pdu": ("node.max_pdu", 100, "node.max_pdu"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_value_names_file_and_key(tmp_path: Path, case: str) -> None:
    dotted, value, reported = BROKEN[case]
    sections = base_config(tmp_path, 11112)
    set_key(sections, dotted, value)
    config = write_config(tmp_path / "broken.toml", sections)
    result = check_config(config)
    assert result.returncode == CONFIG_ERROR, result.stdout + result.stderr
    assert f"{config}: {reported}:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_duplicate_storage_name_is_an_error(tmp_path: Path) -> None:
    sections = base_config(tmp_path, 11112)
    sections["storage"] = [
        {"name": "archive", "path": str(tmp_path / "a")},
        {"name": "archive", "path": str(tmp_path / "b")},
    ]
    config = write_config(tmp_path / "twice.toml", sections)
    result = check_config(config)
    assert result.returncode == CONFIG_ERROR
    assert f"{config}: storage[1].name: duplicate name 'archive'" in result.stderr


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "syntax.toml"
    config.write_text('[node]\nport = 11112\nae_title = "UNTERMINATED\n')
    result = check_config(config)
    assert result.returncode == CONFIG_ERROR
    assert f"{config}: not valid TOML" in result.stderr
    assert "line 3" in result.stderr


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    result = check_config(tmp_path / "nowhere.toml")
    assert result.returncode == CONFIG_ERROR
    assert "nowhere.toml: file not found" in result.stderr


def test_shipped_config_is_valid_and_relative_paths_follow_the_file() -> None:
    result = check_config(REPO / "config.toml")
    assert result.returncode == 0, result.stderr
    assert f"OK: {REPO / 'config.toml'} is valid" in result.stderr
    # data_dir = "./data" resolves against the config file's folder, not the cwd.
    assert str(REPO / "data") in result.stdout
    assert 'ae_title = "DICOMNODE"' in result.stdout
    assert "\nport = 11112\n" in result.stdout


def test_a_lossy_destination_syntax_needs_allow_lossy(tmp_path: Path) -> None:
    from node.config.model import ConfigError, parse_config

    destination = {"name": "ai", "ae_title": "AI", "host": "127.0.0.1", "port": 104}
    lossy = {**destination, "transfer_syntaxes": ["JPEG2000Lossless", "JPEGBaseline8Bit"]}
    with pytest.raises(
        ConfigError, match=r"destination\[0\]\.transfer_syntaxes: JPEGBaseline8Bit is lossy"
    ):
        parse_config({"destination": [lossy]}, tmp_path / "c.toml")
    allowed = parse_config({"destination": [{**lossy, "allow_lossy": True}]}, tmp_path / "c.toml")
    assert allowed.destinations[0].transfer_syntaxes == ("JPEG2000Lossless", "JPEGBaseline8Bit")
