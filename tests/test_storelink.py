"""The forwarder's lean C-STORE requestor (node.storelink) against DCMTK storescp and against
a scripted peer that rejects, aborts, hangs or answers with failure statuses."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
)

from node.config.model import TLSConfig
from node.net.storelink import (
    AssociationRejected,
    LinkError,
    Peer,
    StoreAssociation,
    Timeouts,
    associate,
    read_part10_meta,
)
from node.net.tls import client_context
from tests.certs import make_certificates
from tests.corpus import dataset_bytes, find
from tests.forward_support import StoreSCP
from tests.support import free_port

QUICK = Timeouts(acse=2.0, dimse=2.0, network=2.0)


# --- Part 10 meta ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "rtplan.dcm"]
)
def test_meta_reader_agrees_with_pydicom(name: str) -> None:
    path = find(name)
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    with path.open("rb") as stream:
        found = read_part10_meta(stream)
    assert found.sop_class_uid == meta.MediaStorageSOPClassUID
    assert found.sop_instance_uid == meta.MediaStorageSOPInstanceUID
    assert found.transfer_syntax == meta.TransferSyntaxUID
    assert path.read_bytes()[found.dataset_offset :] == dataset_bytes(path)


def test_meta_reader_refuses_a_file_without_preamble(tmp_path: Path) -> None:
    path = tmp_path / "raw.dcm"
    path.write_bytes(b"\x08\x00\x16\x00" + bytes(200))
    with path.open("rb") as stream, pytest.raises(ValueError, match="not a DICOM Part 10 file"):
        read_part10_meta(stream)


# --- against DCMTK storescp --------------------------------------------------------------------


def open_to(scp: StoreSCP, contexts: list[tuple[str, str]], **extra: object) -> StoreAssociation:
    return associate(
        Peer(scp.ae_title, "127.0.0.1", scp.port),
        "NODETEST",
        contexts,
        max_pdu=int(extra.get("max_pdu", 262144)),  # type: ignore[call-overload]
        timeouts=Timeouts(acse=10, dimse=30, network=30),
    )


def test_storescp_receives_every_byte_in_many_small_pdus(tmp_path: Path) -> None:
    """A peer maximum of 4 KiB splits each dataset into many P-DATA-TF PDUs; storescp must
    still store exactly the bytes we hold, and answer each C-STORE with success."""
    # +B: storescp writes the dataset bit-preserving, so bytes can be compared.
    scp = StoreSCP(tmp_path / "scp", "STORESCP", "--max-pdu", "4096", "+B").start()
    sources = [find("CT_small.dcm"), find("MR_small.dcm")]
    contexts = [(CTImageStorage, ExplicitVRLittleEndian), (MRImageStorage, ExplicitVRLittleEndian)]
    try:
        association = open_to(scp, contexts)
        assert association.max_pdv == 4096 - 6
        statuses = [association.store(path).status for path in sources * 2]
        association.release()
        assert statuses == [0, 0, 0, 0]
        assert not association.established
        stored = {pydicom.dcmread(p).SOPInstanceUID: p for p in scp.files()}
        assert len(stored) == 2  # each sent twice: storescp overwrote the first copy
        for source in sources:
            uid = pydicom.dcmread(source).SOPInstanceUID
            assert dataset_bytes(stored[uid]) == dataset_bytes(source)
    finally:
        scp.stop()


def test_storescp_refuses_some_contexts_and_only_the_accepted_ones_are_used(
    tmp_path: Path,
) -> None:
    scp = StoreSCP(tmp_path / "scp").start()  # storescp's default: uncompressed syntaxes only
    try:
        association = open_to(
            scp,
            [
                (CTImageStorage, HTJ2KLossless),
                (CTImageStorage, ImplicitVRLittleEndian),
                (CTImageStorage, JPEGLSLossless),
                (MRImageStorage, ExplicitVRLittleEndian),
            ],
        )
        assert association.accepted(CTImageStorage) == {ImplicitVRLittleEndian}
        assert association.accepted(MRImageStorage) == {ExplicitVRLittleEndian}
        with pytest.raises(ValueError, match="accepted no context"):
            association.store(find("CT_small.dcm"))  # Explicit VR LE was not proposed for CT
        assert association.store(find("MR_small.dcm")).status == 0
        association.release()
    finally:
        scp.stop()


def test_storescp_refusing_every_association_is_a_rejection(tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "scp", "STORESCP", "--refuse").start()
    try:
        with pytest.raises(AssociationRejected, match=r"rejected by STORESCP@127\.0\.0\.1"):
            open_to(scp, [(CTImageStorage, ExplicitVRLittleEndian)])
    finally:
        scp.stop()


def test_nobody_listening_is_a_connection_error() -> None:
    port = free_port()
    with pytest.raises(LinkError, match=f"cannot connect to X@127.0.0.1:{port}: .*refused"):
        associate(Peer("X", "127.0.0.1", port), "NODETEST", [], max_pdu=0, timeouts=QUICK)


# --- against a scripted peer -------------------------------------------------------------------


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _receive(conn: socket.socket) -> tuple[int, bytes]:
    header = _exactly(conn, 6)
    pdu_type, _, length = struct.unpack(">BBI", header)
    return pdu_type, _exactly(conn, length)


def _exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _until_closed(conn: socket.socket, limit: float = 10.0) -> None:
    """Say nothing until the requestor gives up and closes (or `limit` seconds pass)."""
    conn.settimeout(limit)
    with contextlib.suppress(OSError):
        while conn.recv(65536):
            pass


def _requested_contexts(body: bytes) -> list[tuple[int, bytes]]:
    """(context ID, transfer syntax) of each presentation context item in an A-ASSOCIATE-RQ."""
    found, offset = [], 68
    while offset < len(body):
        item_type, _, length = struct.unpack_from(">BBH", body, offset)
        value = body[offset + 4 : offset + 4 + length]
        if item_type == 0x20:
            syntax_item = value[4 + 4 + struct.unpack_from(">H", value, 6)[0] :]
            found.append((value[0], syntax_item[4:]))
        offset += 4 + length
    return found


def _command(elements: dict[int, bytes]) -> bytes:
    body = b"".join(
        struct.pack("<HHI", 0, tag, len(value)) + value for tag, value in sorted(elements.items())
    )
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


class ScriptedPeer:
    """Accepts one association, proposing contexts all accepted, then acts out `mode`:
    "reject", "abort-at-associate", "silent-at-associate", "status" (answer `status` with an
    error comment), "never-answer", "abort-on-data", "close-when-idle"."""

    def __init__(self, mode: str, status: int = 0x0000, comment: bytes = b"") -> None:
        self.mode, self.status, self.comment = mode, status, comment
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def peer(self) -> Peer:
        return Peer("SCRIPTED", "127.0.0.1", self.port)

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            with contextlib.suppress(ConnectionError, OSError):
                self._act(conn)
            time.sleep(0.5)  # let the requestor see what we sent before the close

    def _act(self, conn: socket.socket) -> None:
        _, request = _receive(conn)
        if self.mode == "reject":
            conn.sendall(_pdu(0x03, bytes([0, 1, 1, 3])))  # permanent, user, calling AE
            return
        if self.mode == "abort-at-associate":
            conn.sendall(_pdu(0x07, bytes(4)))
            return
        if self.mode == "silent-at-associate":
            _until_closed(conn)
            return
        contexts = b"".join(
            _item(0x21, bytes([cid, 0, 0, 0]) + _item(0x40, syntax))
            for cid, syntax in _requested_contexts(request)
        )
        user = _item(0x50, _item(0x51, struct.pack(">I", 16384)))
        app = _item(0x10, b"1.2.840.10008.3.1.1.1")
        conn.sendall(_pdu(0x02, request[:68] + app + contexts + user))
        if self.mode == "close-when-idle":
            return
        message_id, context_id = self._read_request(conn)
        if self.mode == "abort-on-data":
            conn.sendall(_pdu(0x07, bytes(4)))
        elif self.mode == "status":
            response = {
                0x0100: struct.pack("<H", 0x8001),
                0x0120: struct.pack("<H", message_id),
                0x0800: struct.pack("<H", 0x0101),
                0x0900: struct.pack("<H", self.status),
            }
            if self.comment:
                response[0x0902] = self.comment
            command = _command(response)
            half = len(command) // 2  # in two PDVs: the requestor must join them
            pdvs = struct.pack(">IBB", half + 2, context_id, 0x01) + command[:half]
            pdvs += struct.pack(">IBB", len(command) - half + 2, context_id, 0x03) + command[half:]
            conn.sendall(_pdu(0x04, pdvs))
            pdu_type, _ = _receive(conn)  # the A-RELEASE-RQ
            if pdu_type == 0x05:
                conn.sendall(_pdu(0x06, bytes(4)))
        else:  # never-answer
            _until_closed(conn)

    def _read_request(self, conn: socket.socket) -> tuple[int, int]:
        command, context_id = b"", 0
        while True:
            _, body = _receive(conn)
            offset = 0
            while offset < len(body):
                (length,) = struct.unpack_from(">I", body, offset)
                context_id, control = body[offset + 4], body[offset + 5]
                data = body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 0x01:
                    command += data
                    continue
                self.received += data
                if control & 0x02:
                    at = command.index(struct.pack("<HH", 0, 0x0110))
                    return struct.unpack_from("<H", command, at + 8)[0], context_id

    def __enter__(self) -> ScriptedPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        self.thread.join(15)


CT = find("CT_small.dcm")


def scripted_association(peer: ScriptedPeer, timeouts: Timeouts = QUICK) -> StoreAssociation:
    return associate(
        peer.peer(), "NODETEST", [(CTImageStorage, ExplicitVRLittleEndian)], max_pdu=0,
        timeouts=timeouts,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("status", "comment"),
    [(0x0000, b""), (0xB000, b""), (0xA700, b"disk full\x00"), (0xC123, b"cannot parse")],
)
def test_the_peers_status_and_error_comment_come_back_unchanged(
    status: int, comment: bytes
) -> None:
    with ScriptedPeer("status", status, comment) as peer:
        association = scripted_association(peer)
        assert association.max_pdv == 16384 - 6
        response = association.store(CT)
        association.release()
        assert response.status == status
        assert response.error_comment == comment.rstrip(b"\x00").decode()
        assert bytes(peer.received) == dataset_bytes(CT)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("reject", r"rejected by SCRIPTED@.*permanent.*calling AE title not recognised"),
        ("abort-at-associate", "association aborted by SCRIPTED"),
        ("silent-at-associate", "no association with SCRIPTED@.*no answer within 2 s"),
    ],
)
def test_association_failures_say_what_happened(mode: str, message: str) -> None:
    with ScriptedPeer(mode) as peer:
        started = time.monotonic()
        with pytest.raises(LinkError, match=message):
            scripted_association(peer)
        assert time.monotonic() - started < 4


def test_an_abort_instead_of_a_response_is_a_link_error() -> None:
    with ScriptedPeer("abort-on-data") as peer:
        association = scripted_association(peer)
        with pytest.raises(LinkError, match="association aborted by SCRIPTED"):
            association.store(CT)
        assert not association.established


def test_no_response_within_the_dimse_timeout_aborts() -> None:
    with ScriptedPeer("never-answer") as peer:
        association = scripted_association(peer, Timeouts(acse=2, dimse=1, network=2))
        started = time.monotonic()
        with pytest.raises(LinkError, match=r"C-STORE response from SCRIPTED.*nothing for 1 s"):
            association.store(CT)
        assert 0.9 < time.monotonic() - started < 3
        assert not association.established


def test_interrupt_from_another_thread_ends_a_store_waiting_for_its_answer() -> None:
    with ScriptedPeer("never-answer") as peer:
        association = scripted_association(peer, Timeouts(acse=2, dimse=60, network=2))
        threading.Timer(0.5, association.interrupt).start()
        started = time.monotonic()
        with pytest.raises(LinkError, match="SCRIPTED"):
            association.store(CT)
        assert time.monotonic() - started < 3


def test_an_association_the_peer_closed_while_idle_is_not_reused() -> None:
    with ScriptedPeer("close-when-idle") as peer:
        association = scripted_association(peer)
        assert association.is_usable()  # the peer waits 0.5 s before it closes
        time.sleep(1.0)  # the peer closes after 0.5 s
        assert not association.is_usable()
        assert not association.established


def test_tls_association_is_reused_across_c_stores(tmp_path: Path) -> None:
    """One TLS 1.3 association carries several C-STOREs: the idle check between them must not
    mistake TLS records (session tickets, if the server sends any) for the peer leaving."""
    certs = make_certificates(tmp_path / "pki")
    scp = StoreSCP(
        tmp_path / "scp", "TLSSCP", "+tls", str(certs.server_key), str(certs.server_cert),
        "+cf", str(certs.ca),
    ).start()  # fmt: skip
    context = client_context(
        TLSConfig(
            enabled=True,
            ca_bundle=certs.ca,
            certificate=certs.client_cert,
            private_key=certs.client_key,
            min_version="1.3",
        )
    )
    try:
        association = associate(
            Peer("TLSSCP", "127.0.0.1", scp.port), "NODETEST",
            [(CTImageStorage, ExplicitVRLittleEndian), (MRImageStorage, ExplicitVRLittleEndian)],
            max_pdu=0, timeouts=QUICK, tls=(context, "127.0.0.1"),
        )  # fmt: skip
        assert association.sock.version() == "TLSv1.3"
        statuses = []
        for path in [CT, find("MR_small.dcm"), CT]:
            time.sleep(0.2)  # idle long enough for anything the server sends to arrive
            assert association.is_usable()
            statuses.append(association.store(path).status)
        association.release()
        assert statuses == [0, 0, 0]
        assert scp.log().count("Association Received") <= 1
        assert len(scp.files()) == 2
    finally:
        scp.stop()
