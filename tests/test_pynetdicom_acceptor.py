"""node.acceptor: pynetdicom's acceptor behaves as ours does where the node decides.

Each test runs against both acceptors, so any difference between them in
negotiation, admission, statuses, draining or metrics shows up as one failing
variant. The wire-level tests of our own Upper Layer (tests/test_acceptor.py:
trickled requests, paused peers, PDU limits) stay native-only: pynetdicom's DUL
is not ours to hold to them.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    generate_uid,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.certs import Certificates
from tests.conftest import StartNode
from tests.corpus import CT_SMALL, dataset_bytes
from tests.foundation_helpers import associate, pynetdicom_store
from tests.support import (
    BOTH_ACCEPTORS,
    base_config,
    dicom_node,
    free_port,
    storescu,
    wait_for_port,
    wait_until,
    write_config,
)
from tests.test_foundation_durability import put_on, small_disk  # noqa: F401 (a fixture)
from tests.test_metrics import scrape, value
from tests.test_security import certs, client_tls_args, tls_section  # noqa: F401 (a fixture)

PRIVATE_SOP_CLASS = UID("1.2.826.0.1.3680043.9.9999.1")
OUT_OF_RESOURCES = 0xA700


@pytest.mark.parametrize(
    ("node", "key", "why"),
    [
        ({"acceptor": "dcmtk"}, "node.acceptor", "must be one of native, pynetdicom"),
        ({"acceptor": "pynetdicom", "receivers": 2}, "node.receivers", "must be 1 with"),
    ],
    ids=["unknown", "with-receivers"],
)
def test_a_bad_acceptor_setting_names_the_file_and_the_key(
    tmp_path: Path, node: dict[str, object], key: str, why: str
) -> None:
    path = write_config(tmp_path / "config.toml", base_config(tmp_path, free_port(), **node))
    checked = dicom_node("check-config", "-c", str(path), timeout=60)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert f"{path}: {key}: {why}" in checked.stderr


def private_ct(folder: Path) -> Path:
    """CT_small under a private SOP Class UID: accepted and stored like any storage class."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PRIVATE_SOP_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / "private.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@BOTH_ACCEPTORS
def test_negotiation_follows_our_syntax_order_and_serves_private_classes(
    start_node: StartNode, tmp_path: Path
) -> None:
    def our_order(sections: dict[str, object]) -> None:
        sections["accept"] = {"transfer_syntaxes": ["JPEGLSLossless", "ExplicitVRLittleEndian"]}

    node = start_node(our_order)
    assoc = associate(
        node.port,
        [
            (CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGLSLossless]),
            (MRImageStorage, [ImplicitVRLittleEndian]),  # no syntax we accept
            (Verification, [ImplicitVRLittleEndian]),
            (PRIVATE_SOP_CLASS, [ExplicitVRLittleEndian]),
        ],
    )
    assert assoc.is_established
    try:
        accepted = {
            str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
        }
        # Ours, not the requestor's first choice (pynetdicom's own default).
        assert accepted == {
            CTImageStorage: JPEGLSLossless,
            Verification: ImplicitVRLittleEndian,
            PRIVATE_SOP_CLASS: ExplicitVRLittleEndian,
        }
        assert [(str(cx.abstract_syntax), cx.result) for cx in assoc.rejected_contexts] == [
            (MRImageStorage, 0x04)
        ]
        # A private SOP class is served, not an aborted association.
        assert assoc.send_c_store(private_ct(tmp_path)).Status == 0x0000
    finally:
        assoc.release()
    assert wait_until(lambda: list((tmp_path / "archive").rglob("*.dcm")), timeout=30), node.log()


@BOTH_ACCEPTORS
def test_a_spilled_dataset_is_stored_byte_exact_and_leaves_no_file_behind(
    start_node: StartNode, tmp_path: Path
) -> None:
    source = pydicom.dcmread(CT_SMALL)
    source.SOPInstanceUID = generate_uid()
    source.add_new(0x00091010, "OB", bytes(range(256)) * (12 * 1024 * 1024 // 256))
    sent = tmp_path / "sent.dcm"
    source.save_as(sent, enforce_file_format=True)
    node = start_node()
    assert pynetdicom_store(node.port, sent) == 0x0000, node.log()
    archive = tmp_path / "archive"
    assert wait_until(lambda: list(archive.rglob("*.dcm")), timeout=30), node.log()
    assert dataset_bytes(next(archive.rglob("*.dcm"))) == dataset_bytes(sent)
    receiving = tmp_path / "data" / "spool" / ".receiving"
    assert wait_until(lambda: not any(receiving.iterdir()), timeout=10)


@BOTH_ACCEPTORS
def test_a_dataset_that_cannot_spill_on_a_full_disk_is_out_of_resources(
    small_disk: Path,  # noqa: F811
    start_node: StartNode,
    tmp_path: Path,
) -> None:
    # 9 MiB: past the 8 MiB kept in memory, on a 4 MB filesystem.
    source = pydicom.dcmread(CT_SMALL)
    source.SOPInstanceUID = generate_uid()
    source.add_new(0x00091010, "OB", b"\x01" * (9 * 1024 * 1024))
    sent = tmp_path / "big.dcm"
    source.save_as(sent, enforce_file_format=True)
    node = start_node(lambda sections: put_on(small_disk, sections))
    assert pynetdicom_store(node.port, sent) == OUT_OF_RESOURCES, node.log()
    receiving = small_disk / "data" / "spool" / ".receiving"
    assert wait_until(lambda: not any(receiving.iterdir()), timeout=10)
    # The association and the node carry on: a small instance still fits.
    assert pynetdicom_store(node.port, CT_SMALL) == 0x0000
    assert "disk is full" in node.log()


@BOTH_ACCEPTORS
def test_sigterm_drains_the_open_association_and_metrics_count_it(
    start_node: StartNode, tmp_path: Path
) -> None:
    metrics_port = free_port()

    def with_metrics(sections: dict[str, object]) -> None:
        sections["metrics"] = {"address": f"127.0.0.1:{metrics_port}"}
        sections["security"] = {"allowed_calling_aets": ["PYSCU"]}

    node = start_node(with_metrics)
    refused = associate(node.port, [(Verification, [ImplicitVRLittleEndian])], calling="INTRUDER")
    assert refused.is_rejected
    ct = pydicom.dcmread(CT_SMALL)
    assoc = associate(node.port, [(CTImageStorage, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    statuses = [assoc.send_c_store(ct).Status]
    samples = scrape(metrics_port)
    assert value(samples, "dicom_node_associations_active") == 1
    assert value(samples, "dicom_node_associations_accepted_total") == 1
    assert (
        value(samples, "dicom_node_associations_rejected_total", reason="calling_ae_not_allowed")
        == 1
    )
    assert value(samples, "dicom_node_instances_received_total", status="success") == 1

    def send_rest() -> None:
        for _ in range(4):
            time.sleep(0.3)
            ct.SOPInstanceUID = generate_uid()
            statuses.append(assoc.send_c_store(ct).Status)
        assoc.release()

    sender = threading.Thread(target=send_rest)
    sender.start()
    node.signal(signal.SIGTERM)
    # No new associations once stopping, while the open one is still sending.
    assert wait_until(
        lambda: not associate(node.port, [(Verification, [ImplicitVRLittleEndian])]).is_established,
        timeout=5,
    )
    assert sender.is_alive(), "the transfer should still be running"
    sender.join(30)
    assert node.process is not None and node.process.wait(30) == 0, node.log()
    assert statuses == [0x0000] * 5
    assert not assoc.is_aborted
    assert "association released" in node.log()


@BOTH_ACCEPTORS
def test_an_instance_over_max_instance_size_is_out_of_resources(
    start_node: StartNode, tmp_path: Path
) -> None:
    def limited(sections: dict[str, object]) -> None:
        sections["limits"] = {"min_free_space": 0, "max_instance_size": 60_000}

    source = pydicom.dcmread(CT_SMALL)  # 39 KB of dataset, then 30 KB more
    source.SOPInstanceUID = generate_uid()
    source.add_new(0x00091010, "OB", b"\x02" * 30_000)
    sent = tmp_path / "over.dcm"
    source.save_as(sent, enforce_file_format=True)
    node = start_node(limited)
    assert pynetdicom_store(node.port, sent) == OUT_OF_RESOURCES, node.log()
    assert pynetdicom_store(node.port, CT_SMALL) == 0x0000
    assert "max_instance_size=60000" in node.log()


@BOTH_ACCEPTORS
def test_association_limits_hold_in_total_and_per_calling_ae(start_node: StartNode) -> None:
    def per_ae(sections: dict[str, object]) -> None:
        sections["security"] = {"max_associations_per_calling_aet": 1}

    node = start_node(per_ae, max_associations=2)
    echo: list[tuple[str, list[str]]] = [(Verification, [ImplicitVRLittleEndian])]
    held = [associate(node.port, echo, calling="FIRST")]
    try:
        assert held[0].is_established
        refused = [associate(node.port, echo, calling="FIRST")]  # the per-AE limit
        held.append(associate(node.port, echo, calling="SECOND"))
        assert held[1].is_established
        refused.append(associate(node.port, echo, calling="THIRD"))  # the total
        for assoc in refused:
            primitive = assoc.acceptor.primitive
            assert assoc.is_rejected and primitive is not None
            assert (primitive.result, primitive.result_source, primitive.diagnostic) == (2, 3, 2)
    finally:
        for assoc in held:
            assoc.release()
    log = node.log()
    assert "security.max_associations_per_calling_aet=1" in log
    assert "node.max_associations=2" in log


@pytest.mark.parametrize("acceptor", ["pynetdicom"], indirect=True)
def test_pynetdicom_serves_tls_with_a_client_certificate(
    start_node: StartNode,
    tmp_path: Path,
    certs: Certificates,  # noqa: F811
) -> None:
    tls_port = free_port()
    node = start_node(
        lambda sections: sections.update(
            security=tls_section(certs, tls_port, require_client_cert=True)
        )
    )
    wait_for_port(tls_port)
    secure = storescu(tls_port, [CT_SMALL], *client_tls_args(certs))
    assert secure.returncode == 0, secure.stderr + node.log()
    anonymous = storescu(tls_port, [CT_SMALL], "+tla", "+cf", str(certs.ca), timeout=60)
    assert anonymous.returncode != 0
    assert wait_until(lambda: len(list((tmp_path / "archive").rglob("*.dcm"))) == 1, timeout=15)


def test_a_reload_keeps_the_running_acceptor_until_the_restart(tmp_path: Path) -> None:
    from node.config.model import load_config
    from node.daemon.lifecycle import restart_only_changes

    port = free_port()
    running = load_config(write_config(tmp_path / "a.toml", base_config(tmp_path, port)))
    changed = base_config(tmp_path, port, acceptor="pynetdicom")
    loaded = load_config(write_config(tmp_path / "b.toml", changed))
    assert (running.node.acceptor, loaded.node.acceptor) == ("native", "pynetdicom")
    effective, pending = restart_only_changes(running, loaded)
    assert effective.node.acceptor == "native"
    assert pending == ["node.acceptor"]
