"""The shipped unit file passes `systemd-analyze verify` (Debian's systemd package)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import REPO, require_tool

UNIT = REPO / "systemd" / "dicom-node.service"
SHIPPED_EXEC = "/usr/local/bin/dicom-node"


def installed_entry_point() -> Path:
    """The dicom-node script of the environment running the tests."""
    found = Path(sys.executable).parent / "dicom-node"
    return found if found.exists() else Path(shutil.which("dicom-node") or SHIPPED_EXEC)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    text = UNIT.read_text()
    assert f"ExecStart={SHIPPED_EXEC} run" in text
    # verify checks that ExecStart's program exists: point a copy at this environment's
    # entry point, the only line that differs from the shipped file.
    copy = tmp_path / "dicom-node.service"
    copy.write_text(
        text.replace(f"ExecStart={SHIPPED_EXEC}", f"ExecStart={installed_entry_point()}")
    )
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_unit_has_the_daemon_contract() -> None:
    settings = dict(re.findall(r"^(\w+)=(.*)$", UNIT.read_text(), flags=re.MULTILINE))
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["Restart"] == "on-failure"
    assert settings["StateDirectory"] == settings["ConfigurationDirectory"] == "dicom-node"
    assert settings["ProtectSystem"] == "strict"
    assert settings["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert int(settings["WatchdogSec"].rstrip("s")) > 0
    # The stop timeout leaves room for the 30 s association drain plus jobs and database.
    assert int(settings["TimeoutStopSec"].rstrip("s")) >= 60
    assert "#AmbientCapabilities=CAP_NET_BIND_SERVICE" in UNIT.read_text()


TEMPLATE = REPO / "systemd" / "dicom-node@.service"


def test_template_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """dicom-node@.service (one node of a cluster) as an instance, dicom-node@a.service."""
    analyze = require_tool("systemd-analyze")
    text = TEMPLATE.read_text()
    assert f"ExecStart={SHIPPED_EXEC} run --config /etc/dicom-node/%i.toml" in text
    assert "StateDirectory=dicom-node/%i" in text
    copy = tmp_path / "dicom-node@a.service"
    copy.write_text(
        text.replace(f"ExecStart={SHIPPED_EXEC}", f"ExecStart={installed_entry_point()}")
    )
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
    # Everything but the instance's own names is the single node's unit.
    single = dict(re.findall(r"^(\w+)=(.*)$", UNIT.read_text(), flags=re.MULTILINE))
    templated = dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.MULTILINE))
    differ = {key for key in single if single[key] != templated.get(key)}
    assert differ == {"Description", "After", "ExecStart", "StateDirectory"}, differ
