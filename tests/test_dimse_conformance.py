"""DIMSE messages the Storage SCP must answer the way PS3.7 and PS3.4 say, from real peers.

pynetdicom is the SCU where it can send what we test (a C-CANCEL-RQ); the rest
comes from a plain socket speaking PDUs we build, because no well-behaved
toolkit sends a C-STORE-RQ without a data set or on the wrong presentation
context. Each test checks the status and its Error Comment, that the
association still works afterwards (a C-STORE stored byte-exact, a C-ECHO
answered), and what the log says.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom.dsutils import encode

from node.net import pdu
from tests.conftest import StartNode
from tests.corpus import CT_SMALL, dataset_bytes
from tests.foundation_helpers import (
    associate,
    associate_rq_bytes,
    raw_sending,
    read_exactly,
    status_of,
)
from tests.support import REPO, NodeProcess, wait_until

STORAGE_CONTEXT = 1  # CT Image Storage, Explicit VR Little Endian
VERIFICATION_CONTEXT = 3
VERIFICATION = UID("1.2.840.10008.1.1")
PDV_LIMIT = 16 * 1024  # what the raw peer puts in one PDV (under the node's max PDU)


def ct_file(folder: Path, sop_class: str = CTImageStorage) -> Path:
    """CT_small with a fresh SOP Instance UID (and the SOP Class asked for), as a Part 10 file."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def stored_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "archive").rglob("*.dcm"))


def stored_byte_exact(tmp_path: Path, sent: Path) -> bool:
    """Whether the archive holds `sent`'s dataset, byte for byte."""
    expected = dataset_bytes(sent)
    return any(dataset_bytes(stored) == expected for stored in stored_files(tmp_path))


class RawPeer:
    """An association requestor on a plain socket: CT Image Storage and Verification."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(20)
        self.sock.sendall(
            associate_rq_bytes(
                [
                    (STORAGE_CONTEXT, CTImageStorage, [ExplicitVRLittleEndian]),
                    (VERIFICATION_CONTEXT, VERIFICATION, [ImplicitVRLittleEndian]),
                ]
            )
        )
        pdu_type, _ = self.read_pdu()
        assert pdu_type == pdu.A_ASSOCIATE_AC, pdu_type

    def read_exactly(self, size: int) -> bytes:
        return read_exactly(self.sock, size)

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, length = pdu.parse_header(self.read_exactly(6))
        return pdu_type, self.read_exactly(length)

    def send_command(self, context_id: int, command: Dataset) -> None:
        encoded = encode(command, True, True)
        assert encoded is not None
        self.sock.sendall(pdu.encode_command_pdu(context_id, encoded))

    def send_dataset(self, context_id: int, data: bytes) -> None:
        """The data set in PDVs of at most PDV_LIMIT bytes, one PDV per P-DATA-TF."""
        fragments = [data[i : i + PDV_LIMIT] for i in range(0, len(data), PDV_LIMIT)] or [b""]
        for index, fragment in enumerate(fragments):
            control = 0x02 if index == len(fragments) - 1 else 0x00
            pdv = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
            self.sock.sendall(pdu.encode_pdu(pdu.P_DATA_TF, pdv))

    def response(self) -> Dataset:
        """The next PDU, which must be a whole response command set in one PDV."""
        pdu_type, body = self.read_pdu()
        assert pdu_type == pdu.P_DATA_TF, f"PDU type 0x{pdu_type:02X}: {body.hex()}"
        _, _, control = pdu.PDV_HEADER.unpack(body[:6])
        assert control == 0x03, control  # command, last fragment
        return read_dataset(BytesIO(body[6:]), is_implicit_VR=True, is_little_endian=True)

    def store(self, path: Path, message_id: int) -> Dataset:
        """C-STORE a Part 10 file's dataset bytes as they are; the response."""
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        self.send_command(
            STORAGE_CONTEXT,
            request(0x0001, message_id, str(ds.SOPClassUID), str(ds.SOPInstanceUID)),
        )
        self.send_dataset(STORAGE_CONTEXT, dataset_bytes(path))
        return self.response()

    def echo(self, message_id: int) -> Dataset:
        echo = request(0x0030, message_id, VERIFICATION, has_dataset=False)
        self.send_command(VERIFICATION_CONTEXT, echo)
        return self.response()

    def release(self) -> None:
        self.sock.sendall(pdu.encode_release_rq())
        assert self.read_pdu() == (pdu.A_RELEASE_RP, bytes(4))
        self.sock.close()


def request(
    command_field: int,
    message_id: int,
    sop_class: str,
    sop_instance: str = "",
    has_dataset: bool = True,
) -> Dataset:
    ds = Dataset()
    ds.CommandGroupLength = 0  # pynetdicom's encode() fills in the real length
    ds.AffectedSOPClassUID = sop_class
    ds.CommandField = command_field
    ds.MessageID = message_id
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000 if has_dataset else 0x0101
    if sop_instance:
        ds.AffectedSOPInstanceUID = sop_instance
    return ds


def c_cancel(message_id_being_responded_to: int) -> Dataset:
    ds = Dataset()
    ds.CommandGroupLength = 0
    ds.CommandField = 0x0FFF  # C-CANCEL-RQ
    ds.MessageIDBeingRespondedTo = message_id_being_responded_to
    ds.CommandDataSetType = 0x0101
    return ds


def log_lines(node: NodeProcess, level: str, containing: str = "") -> list[str]:
    """The node's log lines at `level` (terminal format) that contain `containing`."""
    return [line for line in node.log().splitlines() if f" {level} " in line and containing in line]


# C-CANCEL-RQ (PS3.7 9.3.2.3): accepted, never answered, and for a C-STORE ignored.


def test_a_c_cancel_from_pynetdicom_is_ignored_and_the_association_goes_on(
    start_node: StartNode,
    tmp_path: Path,
) -> None:
    first, second = ct_file(tmp_path), ct_file(tmp_path)
    node = start_node()
    try:
        assoc = associate(
            node.port,
            [(CTImageStorage, [ExplicitVRLittleEndian]), (VERIFICATION, [ImplicitVRLittleEndian])],
        )
        assert assoc.is_established
        storage = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
        with raw_sending():
            assert status_of(assoc.send_c_store(first, msg_id=7)) == 0x0000
            assoc.send_c_cancel(7, storage.context_id)
            assert status_of(assoc.send_c_store(second, msg_id=8)) == 0x0000
        assert status_of(assoc.send_c_echo(msg_id=9)) == 0x0000
        assert assoc.is_established
        assoc.release()
        assert wait_until(lambda: "association released" in node.log(), timeout=10), node.log()
        assert wait_until(
            lambda: stored_byte_exact(tmp_path, first) and stored_byte_exact(tmp_path, second),
            timeout=30,
        ), node.log()
        cancel = log_lines(node, "INFO", "C-CANCEL-RQ")
        assert len(cancel) == 1, node.log()
        assert "'PYSCU' for Message ID 7 ignored: its C-STORE-RQ was already answered" in cancel[0]
        assert "aborting" not in node.log()
    finally:
        assert node.stop() == 0, node.log()


def test_a_c_cancel_gets_no_response_and_the_next_request_is_answered(
    start_node: StartNode, tmp_path: Path
) -> None:
    sent = ct_file(tmp_path)
    node = start_node()
    try:
        peer = RawPeer(node.port)
        peer.send_command(STORAGE_CONTEXT, c_cancel(41))  # nothing with Message ID 41 is open
        # The first response after the C-CANCEL-RQ must be the C-ECHO's: the cancel had none.
        echo = peer.echo(42)
        assert (echo.CommandField, echo.MessageIDBeingRespondedTo, echo.Status) == (
            0x8030,
            42,
            0x0000,
        )
        store = peer.store(sent, 43)
        assert (store.MessageIDBeingRespondedTo, store.Status) == (43, 0x0000)
        peer.release()
        assert wait_until(lambda: stored_byte_exact(tmp_path, sent), timeout=30), node.log()
        assert node.logged(
            "for Message ID 41 ignored: no request with that Message ID is in progress", timeout=5
        ), node.log()
    finally:
        assert node.stop() == 0, node.log()


def test_a_c_cancel_amid_a_c_store_data_set_is_ignored_and_the_instance_stored(
    start_node: StartNode,
    tmp_path: Path,
) -> None:
    sent = ct_file(tmp_path)
    data = dataset_bytes(sent)
    node = start_node()
    try:
        peer = RawPeer(node.port)
        ds = pydicom.dcmread(sent, stop_before_pixels=True)
        store = request(0x0001, 51, CTImageStorage, str(ds.SOPInstanceUID))
        peer.send_command(STORAGE_CONTEXT, store)
        half = len(data) // 2
        pdv = struct.pack(">LBB", half + 2, STORAGE_CONTEXT, 0x00) + data[:half]
        peer.sock.sendall(pdu.encode_pdu(pdu.P_DATA_TF, pdv))
        peer.send_command(STORAGE_CONTEXT, c_cancel(51))
        peer.send_dataset(STORAGE_CONTEXT, data[half:])
        response = peer.response()
        assert (response.MessageIDBeingRespondedTo, response.Status) == (51, 0x0000)
        assert peer.echo(52).Status == 0x0000
        peer.release()
        assert wait_until(lambda: stored_byte_exact(tmp_path, sent), timeout=30), node.log()
        assert node.logged(
            "for Message ID 51 ignored: a C-STORE-RQ cannot be cancelled, it goes on", timeout=5
        ), node.log()
    finally:
        assert node.stop() == 0, node.log()


# C-STORE-RQs that are not storage requests at all get a failure status, and nothing is stored.


def test_a_c_store_without_a_data_set_gets_0xC210_and_the_association_goes_on(
    start_node: StartNode,
    tmp_path: Path,
) -> None:
    sent = ct_file(tmp_path)
    node = start_node()
    try:
        peer = RawPeer(node.port)
        empty = request(0x0001, 5, CTImageStorage, generate_uid(), has_dataset=False)
        peer.send_command(STORAGE_CONTEXT, empty)
        response = peer.response()
        assert response.CommandField == 0x8001
        assert response.MessageIDBeingRespondedTo == 5
        assert response.Status == 0xC210
        assert response.ErrorComment == (
            "C-STORE-RQ without a data set (Command Data Set Type 0101H)"
        )
        assert response.OffendingElement == 0x00000800
        assert response.AffectedSOPInstanceUID == empty.AffectedSOPInstanceUID
        assert peer.store(sent, 6).Status == 0x0000
        assert peer.echo(7).Status == 0x0000
        peer.release()
        assert wait_until(lambda: stored_byte_exact(tmp_path, sent), timeout=30), node.log()
        assert len(stored_files(tmp_path)) == 1
        refused = log_lines(node, "WARNING", "refused C-STORE-RQ")
        assert len(refused) == 1, node.log()
        assert f"SOP Instance UID {empty.AffectedSOPInstanceUID}" in refused[0]
        assert "with status 0xC210: C-STORE-RQ without a data set" in refused[0]
    finally:
        assert node.stop() == 0, node.log()


def test_a_c_store_for_another_sop_class_than_its_context_gets_0x0122_and_is_not_stored(
    start_node: StartNode,
    tmp_path: Path,
) -> None:
    # An MR instance, announced as MR, on the context negotiated for CT Image Storage.
    wrong = ct_file(tmp_path, sop_class=MRImageStorage)
    sent = ct_file(tmp_path)
    node = start_node()
    try:
        peer = RawPeer(node.port)
        response = peer.store(wrong, 11)
        assert (response.CommandField, response.MessageIDBeingRespondedTo) == (0x8001, 11)
        assert response.Status == 0x0122
        assert response.ErrorComment == (
            f"SOP Class {MRImageStorage} not negotiated on context {STORAGE_CONTEXT}"
        )
        assert response.AffectedSOPClassUID == MRImageStorage
        nameless = request(0x0001, 13, CTImageStorage, generate_uid())
        del nameless.AffectedSOPClassUID
        peer.send_command(STORAGE_CONTEXT, nameless)
        peer.send_dataset(STORAGE_CONTEXT, dataset_bytes(sent))
        response = peer.response()
        assert (response.MessageIDBeingRespondedTo, response.Status) == (13, 0xC210)
        assert response.ErrorComment == "C-STORE-RQ without an Affected SOP Class UID"
        assert response.OffendingElement == 0x00000002
        assert peer.store(sent, 12).Status == 0x0000
        peer.release()
        assert wait_until(lambda: stored_byte_exact(tmp_path, sent), timeout=30), node.log()
        assert len(stored_files(tmp_path)) == 1
        assert not any((tmp_path / "data" / "spool" / ".receiving").iterdir())
        refused = log_lines(node, "WARNING", "refused C-STORE-RQ")
        assert len(refused) == 2, node.log()
        assert "'RAWSCU'" in refused[0] and "with status 0x0122" in refused[0]
        assert "with status 0xC210: C-STORE-RQ without an Affected SOP Class UID" in refused[1]
        assert f"transfer syntax {ExplicitVRLittleEndian}" in refused[0]
    finally:
        assert node.stop() == 0, node.log()


# Other DIMSE requests on an accepted context: 0x0211 once their data set has arrived.


def test_other_requests_are_drained_then_answered_0x0211_and_the_association_goes_on(
    start_node: StartNode,
    tmp_path: Path,
) -> None:
    sent = ct_file(tmp_path)
    node = start_node()
    try:
        peer = RawPeer(node.port)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.PatientName = "X" * 40_000  # an identifier spread over several PDVs
        find = encode(identifier, True, True)
        assert find is not None and len(find) > 2 * PDV_LIMIT
        peer.send_command(VERIFICATION_CONTEXT, request(0x0020, 21, VERIFICATION))
        peer.send_dataset(VERIFICATION_CONTEXT, find)
        answered = peer.response()
        assert (answered.CommandField, answered.MessageIDBeingRespondedTo) == (0x8020, 21)
        assert answered.Status == 0x0211

        action = Dataset()
        action.CommandGroupLength = 0
        action.CommandField = 0x0130  # N-ACTION-RQ, as a Storage Commitment SCU sends it
        action.MessageID = 22
        action.CommandDataSetType = 0x0000
        action.RequestedSOPClassUID = "1.2.840.10008.1.20.1"
        action.RequestedSOPInstanceUID = "1.2.840.10008.1.20.1.1"
        action.ActionTypeID = 1
        peer.send_command(STORAGE_CONTEXT, action)
        peer.send_dataset(STORAGE_CONTEXT, encode(identifier, False, True) or b"")
        answered = peer.response()
        assert (answered.CommandField, answered.MessageIDBeingRespondedTo) == (0x8130, 22)
        assert answered.Status == 0x0211

        assert peer.echo(23).Status == 0x0000
        assert peer.store(sent, 24).Status == 0x0000
        peer.release()
        assert wait_until(lambda: stored_byte_exact(tmp_path, sent), timeout=30), node.log()
        unprovided = log_lines(node, "WARNING", "not a service")
        assert [line.split(" from ")[0].split()[-1] for line in unprovided] == [
            "C-FIND-RQ",
            "N-ACTION-RQ",
        ], node.log()
    finally:
        assert node.stop() == 0, node.log()


# How an association's end is logged.


def test_a_peer_hanging_up_between_pdus_is_info_and_one_cut_off_inside_a_pdu_a_warning(
    start_node: StartNode,
    tmp_path: Path,
) -> None:
    node = start_node()
    try:
        # Released properly by pynetdicom: the peer closes TCP after our A-RELEASE-RP.
        assoc = associate(node.port, [(VERIFICATION, [ImplicitVRLittleEndian])])
        assert status_of(assoc.send_c_echo()) == 0x0000
        assoc.release()
        assert wait_until(lambda: "association released" in node.log(), timeout=10)

        # Hung up at a PDU boundary, after a complete exchange and without A-RELEASE.
        peer = RawPeer(node.port)
        assert peer.echo(1).Status == 0x0000
        peer.sock.close()
        assert wait_until(lambda: node.log().count("association aborted") == 1, timeout=10)

        # Cut off inside a P-DATA-TF: 100 bytes announced, a PDV header and 4 bytes sent.
        peer = RawPeer(node.port)
        pdv_header = pdu.PDV_HEADER.pack(94, STORAGE_CONTEXT, 0x03)
        peer.sock.sendall(struct.pack(">BxL", pdu.P_DATA_TF, 100) + pdv_header + b"\0" * 4)
        peer.sock.close()
        assert wait_until(lambda: node.log().count("association aborted") == 2, timeout=10)

        ended = [line for line in node.log().splitlines() if "ended:" in line]
        assert len(ended) == 2, node.log()
        assert " INFO " in ended[0]
        assert ended[0].endswith(
            "'RAWSCU' ended: the peer closed the connection between PDUs, without A-RELEASE"
        )
        assert " WARNING " in ended[1]
        assert ended[1].endswith(
            "'RAWSCU' ended: the connection closed in the middle of a PDU, 88 bytes early"
        )
        assert "6 bytes early" not in node.log()
        protocol_warnings = log_lines(node, "WARNING", "node.association")
        assert protocol_warnings == ended[1:], node.log()
    finally:
        assert node.stop() == 0, node.log()


# Python warnings go through logging, so journald gets them with a priority and a logger name.

JOURNAL_LINE = re.compile(r"^<[0-7]>[\w.\[\]]+: ")


def test_setup_logging_sends_python_warnings_through_the_journald_formatter() -> None:
    program = (
        "import warnings\n"
        "from node.daemon.logs import setup_logging\n"
        "setup_logging('INFO')\n"
        "warnings.warn('a value pydicom did not like\\nsecond line')\n"
        "from pydicom.misc import warn_and_log\n"
        "warn_and_log('logged and warned by pydicom')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "JOURNAL_STREAM": "8:1234"},
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert lines, "nothing on stderr"
    assert lines[0].startswith("<4>py.warnings: "), run.stderr
    assert "UserWarning: a value pydicom did not like" in lines[0]
    assert lines[-1] == "<4>pydicom: logged and warned by pydicom", run.stderr
    assert all(line.startswith("<4>py.warnings: ") for line in lines[:-1]), run.stderr
    assert run.stderr.count("logged and warned by pydicom") == 1, run.stderr


def test_a_pydicom_warning_in_the_running_node_reaches_journald_with_its_prefix(
    start_node: StartNode,
    tmp_path: Path,
) -> None:
    # A SOP Instance UID with a component that starts with 0 is not a valid UI value:
    # pydicom warns when the node reads it from the data set, in the association's thread
    # and again in the codec worker process that transcodes it. The instance is still stored.
    path = ct_file(tmp_path)
    valid = path.stem
    head, _, last = valid.rpartition(".")
    invalid = f"{head}.0{last[1:]}"
    assert len(last) > 1 and len(invalid) == len(valid)
    ds = pydicom.dcmread(path)
    crafted = tmp_path / "crafted.dcm"
    crafted.write_bytes(path.read_bytes().replace(valid.encode(), invalid.encode()))
    node = start_node(env={"JOURNAL_STREAM": "8:1234"}, stored_as="JPEGLSLossless")
    try:
        peer = RawPeer(node.port)
        peer.send_command(STORAGE_CONTEXT, request(0x0001, 1, str(ds.SOPClassUID), invalid))
        peer.send_dataset(STORAGE_CONTEXT, dataset_bytes(crafted))
        peer.response()  # whatever intake decides, the warning has been raised by now
        peer.release()
        assert wait_until(lambda: f"stored SOP Instance UID {invalid}" in node.log(), timeout=30), (
            node.log()
        )
    finally:
        assert node.stop() == 0, node.log()
    lines = [line for line in node.log().splitlines() if line.strip()]
    assert all(JOURNAL_LINE.match(line) for line in lines), node.log()
    # pydicom logs the complaint and then warns it: one line each time, not a logged line
    # followed by the same text again from py.warnings.
    warned = [line for line in lines if f"Invalid value for VR UI: '{invalid}'" in line]
    assert len(warned) >= 2 and all(line.startswith("<4>pydicom: ") for line in warned), node.log()
    assert "-> JPEGLSLossless" in node.log()  # a codec worker read it too
    assert "py.warnings" not in node.log()


def test_a_c_store_whose_affected_sop_instance_uid_is_not_ascii_gets_a_status(
    start_node: StartNode,
    tmp_path: Path,
) -> None:
    """The response echoes the request's UIDs; a byte that is not ASCII must not abort it."""
    sent = ct_file(tmp_path)
    node = start_node()
    try:
        peer = RawPeer(node.port)
        placeholder = "1.2.3.4.5.6.7.8.9"
        command = encode(request(0x0001, 51, CTImageStorage, placeholder), True, True)
        assert command is not None
        hostile = bytes(command).replace(placeholder.encode(), b"1.2.3.4.5.6.7.8.\xe9")
        peer.sock.sendall(pdu.encode_command_pdu(STORAGE_CONTEXT, hostile))
        peer.send_dataset(STORAGE_CONTEXT, dataset_bytes(sent))
        refused = peer.response()
        assert (refused.MessageIDBeingRespondedTo, refused.Status) == (51, 0xC210)
        stored = peer.store(sent, 52)
        assert (stored.MessageIDBeingRespondedTo, stored.Status) == (52, 0x0000)
        peer.release()
        assert "internal error" not in node.log()
    finally:
        assert node.stop() == 0, node.log()
