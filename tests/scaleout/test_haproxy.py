"""Nodes behind HAProxy, configured as docs/scale-out.md shows: the C-ECHO health check,
and draining on SIGTERM (the open association finishes, new ones go elsewhere)."""

from __future__ import annotations

import signal
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from node.cli.haproxy_cli import check_rules
from tests.conftest import StartNode
from tests.haproxy import HAProxy, documented_config
from tests.support import wait_until


def ct_instance() -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    return ds


def test_the_documented_health_check_is_what_haproxy_check_prints() -> None:
    text = documented_config()
    for rule in check_rules("DICOMNODE", "HAPROXY"):
        assert rule in text, f"docs/scale-out.md lacks: {rule[:60]}"


def test_sigterm_drains_a_node_behind_haproxy(start_node: StartNode, tmp_path: Path) -> None:
    nodes = {name: start_node(root=tmp_path / name) for name in ("a", "b")}
    with HAProxy(tmp_path / "haproxy", [(n, p.port) for n, p in nodes.items()]) as haproxy:
        haproxy.wait_for({"a": "UP", "b": "UP"})  # the C-ECHO check passes on both
        assert all(node.logged("HAPROXY", timeout=5) for node in nodes.values())
        ae = AE(ae_title="DRAIN1")
        ae.add_requested_context(CTImageStorage)
        association = ae.associate("127.0.0.1", haproxy.port, ae_title="DICOMNODE")
        assert association.is_established
        try:
            assert association.send_c_store(ct_instance()).Status == 0x0000
            assert wait_until(lambda: any("DRAIN1" in n.log() for n in nodes.values()), 10)
            (busy,) = [name for name, node in nodes.items() if "DRAIN1" in node.log()]
            other = "b" if busy == "a" else "a"
            nodes[busy].signal(signal.SIGTERM)
            # It closes its listener: the next health check fails, HAProxy stops sending to it.
            haproxy.wait_for({busy: "DOWN", other: "UP"}, timeout=15)
            # ... while the association it has keeps going.
            assert association.send_c_store(ct_instance()).Status == 0x0000
        finally:
            association.release()
        assert nodes[busy].process is not None and nodes[busy].process.wait(30) == 0
        later = AE(ae_title="DRAIN2")
        later.add_requested_context(CTImageStorage)
        association = later.associate("127.0.0.1", haproxy.port, ae_title="DICOMNODE")
        assert association.is_established
        assert association.send_c_store(ct_instance()).Status == 0x0000
        association.release()
        assert nodes[other].logged("DRAIN2", timeout=10)
        assert "DRAIN2" not in nodes[busy].log()
