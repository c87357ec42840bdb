"""Peers for the tests: pynetdicom as a sender of files and of raw bytes, and the pieces of
a raw-socket peer (an A-ASSOCIATE-RQ built with pynetdicom's encoders, exact reads)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import imagecodecs
import pydicom
from pydicom import uid as _uid
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from tests.corpus import CT_SMALL

NO_STATUS = -1


def associate(
    port: int,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    calling: str = "PYSCU",
    called: str = "DICOMNODE",
    timeout: float = 30,
    acse_timeout: float | None = None,
    ext_neg: list[Any] | None = None,
) -> Association:
    """A pynetdicom association to the node on 127.0.0.1:port, proposing `contexts`
    ((SOP Class UID, transfer syntaxes) each). `timeout` is pynetdicom's ACSE, DIMSE and
    network (idle) timeout; `acse_timeout`, when given, the ACSE one alone."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    if acse_timeout is not None:
        ae.acse_timeout = acse_timeout
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, list(syntaxes))
    rejections: list[A_ASSOCIATE_RJ] = []

    def on_pdu(event: evt.Event) -> None:  # in pynetdicom's DUL thread, as the PDU arrives
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=called,
        ext_neg=ext_neg,
        evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)],
    )
    if rejections and assoc.is_aborted and not assoc.is_rejected:
        # pynetdicom 3.0's race: its DUL thread reads a prompt A-ASSOCIATE-RJ and closes the
        # connection (AE-4) before the requesting thread checks that the connection was made;
        # that thread then sees it closed, takes it for a failed connect and calls it an
        # abort. On a loaded machine this happened to the node's rejections. It was a reject.
        assoc.acceptor.primitive = rejections[0].to_primitive()
        assoc.is_aborted, assoc.is_rejected = False, True
    return assoc


def associate_rq_bytes(
    contexts: Sequence[tuple[int, str, Sequence[str]]],
    *,
    calling: str = "RAWSCU",
    called: str = "DICOMNODE",
    max_pdu: int = 0,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing (presentation context ID, SOP Class UID, transfer
    syntaxes) each, for a peer on a plain socket; max_pdu 0 means no limit."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    proposed = []
    for context_id, sop_class, syntaxes in contexts:
        context = build_context(sop_class, list(syntaxes))
        context.context_id = context_id
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    primitive.user_information = [max_length]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return bytes(request.encode())


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes from the socket; ConnectionError if the peer closes first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


@contextmanager
def raw_sending() -> Iterator[None]:
    """Make pynetdicom send a file's dataset bytes as they are on disk.

    By default send_c_store(path) reads the file with pydicom and re-encodes it
    (dropping group lengths, failing on odd files); in chunked mode it streams
    the bytes after the file meta unchanged, which is what a modality sends.
    """
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def status_of(response: pydicom.Dataset) -> int:
    return int(response.Status) if "Status" in response else NO_STATUS


def pynetdicom_store(
    port: int, path: Path, *, calling: str = "PYSCU", called: str = "DICOMNODE"
) -> int:
    """C-STORE one file in its own transfer syntax; the status, or -1 without one."""
    ds = pydicom.dcmread(path)
    contexts = [(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])]
    assoc = associate(port, contexts, calling=calling, called=called)
    assert assoc.is_established, "association was not accepted"
    try:
        with raw_sending():
            return status_of(assoc.send_c_store(path))
    finally:
        assoc.release()


def part10_file(
    folder: Path, sop_class: str, sop_instance: str, encoded: bytes, syntax: str
) -> Path:
    """A file with valid file meta and whatever dataset bytes we crafted after it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path = folder / f"crafted-{uuid.uuid4().hex}.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + buffer.getvalue() + encoded)
    return path


def store_raw_bytes(
    port: int,
    folder: Path,
    sop_class: str,
    sop_instance: str,
    encoded: bytes,
    syntax: str = _uid.ExplicitVRLittleEndian,
) -> int:
    """C-STORE bytes we crafted as the dataset; return the status (-1: none).

    pynetdicom sends a file given by path without decoding it: the dataset
    bytes after the file meta go on the wire as they are.
    """
    path = part10_file(folder, sop_class, sop_instance, encoded, syntax)
    assoc = associate(port, [(sop_class, [syntax])])
    assert assoc.is_established, "association was not accepted"
    try:
        with raw_sending():
            return status_of(assoc.send_c_store(path))
    finally:
        if assoc.is_established:
            assoc.release()


def encoded_dataset(path: Path = CT_SMALL) -> tuple[str, str, bytes]:
    """(SOP Class UID, SOP Instance UID, Explicit VR Little Endian dataset bytes) of a file."""
    ds = pydicom.dcmread(path)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    # write_dataset writes the dataset alone (no preamble, no file meta): the wire form.
    write_dataset(buffer, ds)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), buffer.getvalue()


def htj2k_copy(folder: Path, syntax: str) -> Path:
    """CT_small encoded as HTJ2K with OpenJPH (imagecodecs), with a fresh SOP Instance UID."""
    ds = pydicom.dcmread(CT_SMALL)
    frame = ds.pixel_array
    lossless = UID(syntax) != _uid.HTJ2K
    rpcl = UID(syntax) == _uid.HTJ2KLosslessRPCL
    stream = imagecodecs.htj2k_encode(
        frame,
        reversible=lossless,
        tlm=rpcl or None,
        tilepart=imagecodecs.HTJ2K.TILEPART.RESOLUTIONS if rpcl else None,
    )
    ds.PixelData = encapsulate([bytes(stream)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / f"htj2k-{syntax}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
