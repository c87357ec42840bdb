"""The acceptor's protocol against a peer that misbehaves on the wire, byte by byte.

The peer here is a plain socket speaking PDUs we build (with pynetdicom's
encoders for the association request), so each test can stop, pause or lie
exactly where it wants to.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode

from node.ingest.receiving import ArrivingDataset
from node.net import pdu
from node.net.association import AcceptorSettings, Association
from node.net.pduguard import ReceiveLimits
from tests.conftest import StartNode
from tests.corpus import CT_SMALL, dataset_bytes
from tests.foundation_helpers import associate_rq_bytes, pynetdicom_store, read_exactly
from tests.support import wait_until

CONTEXT_ID = 1


def raw_association(port: int) -> socket.socket:
    """A plain socket to the node with an association for CT Image Storage established."""
    sock = socket.create_connection(("127.0.0.1", port))
    negotiate(sock)
    return sock


def negotiate(sock: socket.socket) -> None:
    """Send an A-ASSOCIATE-RQ for CT Image Storage and read the A-ASSOCIATE-AC."""
    sock.settimeout(20)
    sock.sendall(associate_rq_bytes([(CONTEXT_ID, CTImageStorage, [ExplicitVRLittleEndian])]))
    pdu_type, length = pdu.parse_header(read_exactly(sock, 6))
    read_exactly(sock, length)
    assert pdu_type == pdu.A_ASSOCIATE_AC


def command(field: int, sop_instance: str, has_dataset: bool = True) -> bytes:
    ds = pydicom.Dataset()
    ds.CommandGroupLength = 0
    ds.AffectedSOPClassUID = CTImageStorage
    ds.CommandField = field
    ds.MessageID = 1
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000 if has_dataset else 0x0101
    ds.AffectedSOPInstanceUID = sop_instance
    encoded = encode(ds, True, True)
    assert encoded is not None
    return encoded


def dataset_pdu(fragment: bytes, last: bool) -> bytes:
    pdv = struct.pack(">LBB", len(fragment) + 2, CONTEXT_ID, 0x02 if last else 0x00) + fragment
    return struct.pack(">BxL", pdu.P_DATA_TF, len(pdv)) + pdv


def response_status(sock: socket.socket) -> int:
    pdu_type, length = pdu.parse_header(read_exactly(sock, 6))
    body = read_exactly(sock, length)
    assert pdu_type == pdu.P_DATA_TF
    response = read_dataset(BytesIO(body[6:]), is_implicit_VR=True, is_little_endian=True)
    return int(response.Status)


def arrive(arriving: ArrivingDataset, fragment: bytes) -> None:
    """What the association does with a fragment read from the socket."""
    arriving.region(len(fragment))[:] = fragment
    arriving.filled(len(fragment))


def test_a_large_dataset_spills_to_disk_and_is_discarded_when_the_peer_vanishes(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "arriving"
    folder.mkdir()
    arriving = ArrivingDataset(folder, spill_at=1000)
    arrive(arriving, b"a" * 600)
    assert list(folder.iterdir()) == []  # still in memory
    arrive(arriving, b"b" * 600)
    with arriving.contents() as (data, on_disk):
        assert bytes(data) == b"a" * 600 + b"b" * 600
        assert on_disk is not None and on_disk.length == 1200
    arriving.discard()
    assert list(folder.iterdir()) == []


def test_a_connection_lost_mid_dataset_leaves_nothing_behind(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node()
    try:
        sock = raw_association(node.port)
        sock.sendall(pdu.encode_command_pdu(CONTEXT_ID, command(0x0001, generate_uid())))
        for _ in range(48):  # 12 MiB in PDUs under max_pdu: past the 8 MiB held in memory
            sock.sendall(dataset_pdu(b"\0" * (256 * 1024 - 64), last=False))
        receiving = tmp_path / "data" / "spool" / ".receiving"
        assert wait_until(lambda: any(receiving.iterdir()), timeout=10), "nothing spilled"
        sock.close()
        assert wait_until(lambda: not any(receiving.iterdir()), timeout=10)
        assert "association from 127.0.0.1" in node.log()
        assert node.alive()
    finally:
        assert node.stop() == 0, node.log()


def test_a_command_the_node_does_not_provide_gets_a_status_not_a_hang(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node()
    try:
        sock = raw_association(node.port)
        # C-FIND-RQ (0x0020) on the storage context, without a dataset.
        sock.sendall(pdu.encode_command_pdu(CONTEXT_ID, command(0x0020, "", has_dataset=False)))
        assert response_status(sock) == 0x0211
        sock.sendall(struct.pack(">BxL", pdu.A_RELEASE_RQ, 4) + bytes(4))
        assert pdu.parse_header(read_exactly(sock, 6)) == (pdu.A_RELEASE_RP, 4)
        sock.close()
        assert wait_until(lambda: "is not a service the node provides" in node.log(), timeout=5)
    finally:
        assert node.stop() == 0, node.log()


@pytest.mark.parametrize("pause_in_message", [True, False])
def test_a_paused_peer_is_dropped_after_the_matching_timeout(
    start_node: StartNode, tmp_path: Path, pause_in_message: bool
) -> None:
    # dimse_timeout bounds a pause inside a message, network_timeout an idle association.
    node = start_node(dimse_timeout=1.0, network_timeout=4.0)
    try:
        sock = raw_association(node.port)
        if pause_in_message:
            sock.sendall(pdu.encode_command_pdu(CONTEXT_ID, command(0x0001, generate_uid())))
        started = time.monotonic()
        sock.settimeout(60)
        closed = b""
        try:
            while True:
                chunk = sock.recv(4096)
                closed += chunk
                if not chunk:
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        waited = time.monotonic() - started
        assert closed[:1] == bytes([pdu.A_ABORT]), closed[:16]
        if pause_in_message:
            assert 0.9 < waited < 3.5, waited
        else:
            assert 3.9 < waited < 10, waited
        assert "no PDU for" in node.log()
    finally:
        assert node.stop() == 0, node.log()


class FailingStore:
    """Handlers whose C-STORE handling has a bug: it raises."""

    def __init__(self) -> None:
        self.ended: list[bool] = []

    def admit(self, assoc: Association) -> None:
        return None

    def established(self, assoc: Association) -> None:
        pass

    def rejected(self, assoc: Association, refusal: object) -> None:
        pass

    def closed(self, assoc: Association, aborted: bool) -> None:
        self.ended.append(aborted)

    def echo(self, assoc: Association, command: object) -> int:
        return 0

    def store(self, *args: object) -> tuple[int, str]:
        raise RuntimeError("a bug in a handler")


def test_an_internal_error_aborts_the_association_and_says_so(tmp_path: Path) -> None:
    settings = AcceptorSettings(
        max_pdu=0,
        acse_timeout=10,
        dimse_timeout=10,
        network_timeout=10,
        limits=ReceiveLimits(),
        receiving_folder=tmp_path,
        negotiate=lambda request: [pdu.ContextResult(CONTEXT_ID, 0, ExplicitVRLittleEndian)],
        implementation_class_uid="1.2.3",
        implementation_version_name="TEST",
    )
    handlers = FailingStore()
    ours, theirs = socket.socketpair()
    assoc = Association(ours, ("127.0.0.1", 1), settings, handlers)  # type: ignore[arg-type]
    thread = threading.Thread(target=assoc.run)
    thread.start()
    negotiate(theirs)
    theirs.sendall(pdu.encode_command_pdu(CONTEXT_ID, command(0x0001, generate_uid())))
    theirs.sendall(dataset_pdu(b"\0" * 100, last=True))
    assert pdu.parse_header(read_exactly(theirs, 6)) == (pdu.A_ABORT, 4)
    thread.join(10)
    assert not thread.is_alive()
    assert handlers.ended == [True]


def trickle(sock: socket.socket, stop: threading.Event, gaps: list[float]) -> None:
    """A byte every 0.1 s until told to stop or the node closes the connection."""
    last = time.monotonic()
    while not stop.wait(0.1):
        try:
            sock.sendall(b"\0")
        except OSError:
            return
        now = time.monotonic()
        gaps.append(now - last)
        last = now


def test_an_association_request_trickled_byte_by_byte_is_cut_off_at_acse_timeout(
    start_node: StartNode,
    tmp_path: Path,
) -> None:
    # The deadline covers the whole A-ASSOCIATE-RQ, so the node closes the connection about
    # acse_timeout after accepting it, however slowly this machine runs. The trickle would take
    # 100 s to complete the 1000-byte request (50 x acse_timeout), with each gap far inside the
    # timeout: a per-read timeout would keep the connection open for all of that.
    acse_timeout = 2.0
    node = start_node(acse_timeout=acse_timeout)
    stop = threading.Event()
    try:
        started = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", node.port))
        sock.sendall(struct.pack(">BxL", pdu.A_ASSOCIATE_RQ, 1000))
        gaps: list[float] = []
        trickler = threading.Thread(target=trickle, args=(sock, stop, gaps), daemon=True)
        trickler.start()
        sock.settimeout(10 * acse_timeout)
        try:
            answer = sock.recv(1)  # b"" when the node closes (FIN)
        except ConnectionResetError:  # it closed with our bytes unread (RST)
            answer = b""
        except TimeoutError:
            pytest.fail(f"still open after {10 * acse_timeout} s of trickling")
        closed_after = time.monotonic() - started
        stop.set()
        trickler.join()
        sock.close()
        assert answer == b"", answer
        assert acse_timeout <= closed_after < 10 * acse_timeout, closed_after
        # The bytes kept coming until the end, so no single read waited the timeout out.
        assert len(gaps) > 2 and max(gaps) < acse_timeout / 2, gaps
        assert f"no complete association request in {acse_timeout} s" in node.log()
        assert node.alive()
    finally:
        stop.set()
        assert node.stop() == 0, node.log()


@pytest.mark.parametrize(("pdu_size", "extra"), [(4096, 200_000), (16384, 12 * 1024 * 1024)])
def test_datasets_in_many_small_pdus_and_spilled_ones_are_stored_byte_exact(
    start_node: StartNode, tmp_path: Path, pdu_size: int, extra: int
) -> None:
    # Many PDVs per dataset (4 KiB PDUs), and one past the 8 MiB kept in memory. The
    # sender streams the file's bytes as they are (storescu would re-encode them).
    source = pydicom.dcmread(CT_SMALL)
    source.SOPInstanceUID = generate_uid()
    source.add_new(0x00091010, "OB", bytes(range(256)) * (extra // 256))
    sent = tmp_path / "sent.dcm"
    source.save_as(sent, enforce_file_format=True)
    node = start_node(max_pdu=pdu_size)
    try:
        assert pynetdicom_store(node.port, sent) == 0x0000, node.log()
        archive = tmp_path / "archive"
        assert wait_until(lambda: list(archive.rglob("*.dcm")), timeout=30), node.log()
        stored = next(archive.rglob("*.dcm"))
        assert dataset_bytes(stored) == dataset_bytes(sent)
        assert not any((tmp_path / "data" / "spool" / ".receiving").iterdir())
    finally:
        assert node.stop() == 0, node.log()


def test_after_a_reject_the_node_waits_for_the_requestor_to_close(start_node: StartNode) -> None:
    """PS3.8 Sta13: the requestor closes after an A-ASSOCIATE-RJ. A node that closed first
    could reset the connection before the reject was read (pynetdicom then saw an abort)."""
    node = start_node()
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.settimeout(10)
        sock.sendall(
            associate_rq_bytes([(1, CTImageStorage, [ExplicitVRLittleEndian])], called="NOTUS")
        )
        pdu_type, length = pdu.parse_header(read_exactly(sock, 6))
        body = read_exactly(sock, length)
        assert (pdu_type, body[1:4]) == (pdu.A_ASSOCIATE_RJ, bytes([1, 1, 7]))
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):  # still open: the node waits for our close
            sock.recv(1)
    # A requestor that never closes is cut off after the ARTIM bound.
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.settimeout(10)
        sock.sendall(
            associate_rq_bytes([(1, CTImageStorage, [ExplicitVRLittleEndian])], called="NOTUS")
        )
        pdu_type, length = pdu.parse_header(read_exactly(sock, 6))
        read_exactly(sock, length)
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert 3.0 < time.monotonic() - started < 9.0
