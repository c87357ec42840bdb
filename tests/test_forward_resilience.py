"""A destination that is down, or a node killed with -9, loses nothing and blocks nobody."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import StartNode
from tests.corpus import copies_with_new_uids, find, sop_instance_uid
from tests.forward_support import (
    StoreSCP,
    destination,
    queue_cli,
)
from tests.orthanc import Orthanc
from tests.support import NodeProcess, storescu, wait_until

pytestmark = pytest.mark.timeout(240)

OUTAGE = 30.0  # seconds Orthanc stays down after the last instance arrived


def acknowledged(output: str) -> int:
    """How many C-STOREs storescu -v saw answered with Success."""
    return output.count("Received Store Response (Success)")


def pending_jobs(config: Path) -> dict[str, int]:
    status = queue_cli(config, "status", "--json")
    assert status.returncode == 0, status.stderr
    pending: dict[str, int] = {}
    for row in json.loads(status.stdout):
        if row["state"] in ("pending", "running"):
            pending[row["target"]] = pending.get(row["target"], 0) + row["count"]
    return pending


def orthanc_uids(orthanc: Orthanc) -> set[str]:
    return {sop_instance_uid(blob) for blob in orthanc.files()}


def start_forwarding_node(
    start_node: StartNode, orthanc: Orthanc, scp: StoreSCP, **pacs: object
) -> tuple[Path, NodeProcess]:
    """The node forwarding everything to Orthanc ('pacs') and to a storescp ('second')."""
    destinations = [
        destination("pacs", "ORTHANC", orthanc.dicom_port, **pacs),
        destination("second", "SECOND", scp.port),
    ]
    node = start_node(lambda config: config.update(destination=destinations))
    return node.config_path, node


def test_outage_orthanc_down_30s_other_destination_on_time(
    start_node: StartNode, tmp_path: Path
) -> None:
    files = copies_with_new_uids(find("CT_small.dcm"), tmp_path / "send", 100)
    uids = {sop_instance_uid(p) for p in files}
    orthanc = Orthanc(tmp_path / "orthanc")  # configured, not started: the destination is down
    scp = StoreSCP(tmp_path / "scp", "SECOND", "-v").start()
    config, node = start_forwarding_node(start_node, orthanc, scp, max_associations=2)
    try:
        sent = storescu(node.port, files, "-v")
        assert sent.returncode == 0, sent.stderr
        assert acknowledged(sent.stderr) == 100, sent.stderr[-2000:]
        arrived_at = time.monotonic()

        # The other destination is not held up by the dead one.
        assert wait_until(lambda: scp.count() == 100, timeout=20), node.log()[-3000:]
        assert {sop_instance_uid(p) for p in scp.files()} == uids
        # Associations are reused for many instances, then released when idle (2 s here).
        assert wait_until(lambda: "Association Release" in scp.log(), timeout=10), scp.log()
        assert scp.log().count("Association Received") <= 3, scp.log()[-3000:]
        assert pending_jobs(config).get("pacs") == 100
        status = queue_cli(config, "status").stdout
        assert "pacs" in status and "connection refused" in status.lower(), status

        time.sleep(max(0.0, OUTAGE - (time.monotonic() - arrived_at)))
        orthanc.start()
        assert wait_until(lambda: orthanc.count() == 100, timeout=40), node.log()[-3000:]
        assert orthanc_uids(orthanc) == uids
        assert wait_until(lambda: not pending_jobs(config), timeout=10)
        assert node.stop() == 0, node.log()[-3000:]
    finally:
        node.kill()
        orthanc.stop()
        scp.stop()
    assert not list((tmp_path / "data" / "spool").rglob("*.dcm"))


def test_kill_9_with_backlog_then_restart_delivers_everything(
    start_node: StartNode, tmp_path: Path
) -> None:
    count = 400
    files = copies_with_new_uids(find("CT_small.dcm"), tmp_path / "send", count)
    uids = {sop_instance_uid(p) for p in files}
    orthanc = Orthanc(tmp_path / "orthanc")  # down during the send: a guaranteed backlog
    scp = StoreSCP(tmp_path / "scp", "SECOND").start()
    config, node = start_forwarding_node(start_node, orthanc, scp)
    try:
        sent = storescu(node.port, files, "-v")
        assert acknowledged(sent.stderr) == count, sent.stderr[-2000:]
        node.kill()  # SIGKILL while delivering to 'second' and storing into 'archive'
        backlog = pending_jobs(config)
        assert sum(backlog.values()) >= count, backlog

        orthanc.start()
        node = NodeProcess(config, node.port).start()
        assert wait_until(lambda: orthanc.count() == count, timeout=90), node.log()[-3000:]
        assert wait_until(lambda: scp.count() == count, timeout=30)
        assert wait_until(lambda: not pending_jobs(config), timeout=30), pending_jobs(config)
        assert orthanc_uids(orthanc) == uids
        assert {sop_instance_uid(p) for p in scp.files()} == uids
        archived = list((tmp_path / "archive").rglob("*.dcm"))
        assert {sop_instance_uid(p) for p in archived} == uids
        assert node.stop() == 0
    finally:
        node.kill()
        orthanc.stop()
        scp.stop()
    assert not list((tmp_path / "data" / "spool").rglob("*.dcm"))
