"""With when = "delivered" and the destination down, the report waits for the destination; a
kill -9 in between loses nothing: after the restart the report still arrives, once."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.commitment.peers import Modality, ReportReceiver, references
from tests.corpus import CT_SMALL, copies_with_new_uids
from tests.forward_support import StoreSCP
from tests.support import TERMINAL_LOG, NodeProcess, configured_node, dicom_node, wait_until


def _pending_commitments(node: NodeProcess) -> str:
    return dicom_node("queue", "-c", str(node.config_path), "status").stdout


def test_report_waits_for_the_destination_and_survives_kill_9(tmp_path: Path) -> None:
    receiver = ReportReceiver("CT01").start()
    pacs = StoreSCP(tmp_path / "pacs", "PACS")  # its port is chosen; it starts later
    try:

        def edit(sections: dict[str, object]) -> None:
            sections["destination"] = [
                {
                    "name": "pacs",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": pacs.port,
                    "retry": {"initial_delay": 0.5, "max_delay": 1.0},
                }
            ]
            sections["commitment"] = {
                "enabled": True,
                "when": "delivered",
                "report_timeout": 300,
                "requestor": [{"ae_title": "CT01", "host": "127.0.0.1", "port": receiver.port}],
            }

        node = configured_node(tmp_path / "node", edit).start()
        files = copies_with_new_uids(CT_SMALL, tmp_path / "sent", 2)
        refs = references(files)
        assert Modality(node.port, "CT01").send_and_request(files, "2.25.7001", refs) == 0x0000
        # Stored, but not delivered: the request stays open and no report goes out.
        assert wait_until(lambda: "stored SOP Instance UID" in node.log(), timeout=20)
        status = _pending_commitments(node)
        assert re.search(r"requested\s+CT01\s+1\s+2", status), status
        time.sleep(2.0)  # a report sent too early would have arrived by now
        assert receiver.reports == []

        node.kill()  # SIGKILL: no shutdown code runs
        restarted = NodeProcess(node.config_path, node.port, env=TERMINAL_LOG).start()
        try:
            assert receiver.reports == []
            pacs.start()
            reports = receiver.wait(1, timeout=60)
            assert [(r.transaction_uid, r.event_type_id, sorted(r.committed)) for r in reports] == [
                ("2.25.7001", 1, sorted(uid for _cls, uid in refs))
            ], restarted.log_tail(40)
            assert wait_until(lambda: pacs.count() == 2, timeout=20)
            time.sleep(2.0)  # time for a second report, if there were to be one
            assert len(receiver.reports) == 1
            assert "requested" not in _pending_commitments(restarted)
        finally:
            restarted.kill()
    finally:
        pacs.kill()
        receiver.stop()
