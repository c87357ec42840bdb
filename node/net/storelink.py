"""A lean C-STORE requestor over one TCP (or TLS) socket, used by the forwarder.

Why not pynetdicom here: its association runs a reactor thread that polls with
sleeps, and send_c_store parses every file's meta with pydicom, builds the
command with pydicom and pauses the reactor around each message. Profiled
against DCMTK storescp, that cost about 10 ms per CT instance (storescu needs
about 1.7 ms). This module speaks just what forwarding needs (PS3.8 upper
layer, PS3.7 C-STORE), synchronously, on the calling thread:

- A-ASSOCIATE-RQ with one transfer syntax per presentation context; the
  A-ASSOCIATE-AC tells which the peer accepted, the A-ASSOCIATE-RJ why not.
- C-STORE-RQ: the command set written by hand in Implicit VR Little Endian,
  then the dataset bytes streamed from the Part 10 file exactly as stored,
  in P-DATA-TF PDUs no longer than the peer's maximum.
- The C-STORE-RSP status (and error comment); A-RELEASE; A-ABORT.

Every failure to talk to the peer raises LinkError with a message that says
what happened; the forwarder decides about retries.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import BinaryIO

from node.dicom.header import LONG_VRS
from node.ingest.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, PREAMBLE
from node.net import dimse
from node.net.dimse import (
    CommandError,
    command_elements,
    encode_store_request,
    text_value,
    us_value,
)
from node.net.pdu import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    APPLICATION_CONTEXT_NAME,
    P_DATA_TF,
    SERVICE_USER,
    encode_abort,
    encode_command_pdu,
    encode_pdu,
    encode_release_rp,
    encode_release_rq,
    encode_user_identity_rq,
    item,
)

PROTOCOL_VERSION = 1
# Message control header bits of a PDV (PS3.8 E.2)
COMMAND, LAST = 0x01, 0x02
# With an unlimited peer maximum (0), datasets still go in pieces of this size: bounded memory.
UNLIMITED_PDV = 4 * 1024 * 1024
# What a destination identifies us by: a username, and a passcode (None: type 1, username only).
UserIdentity = tuple[str, bytes | None]
# Largest PDU we accept from a peer whatever it claims: a response is a few hundred bytes.
MAX_INCOMING_PDU = 16 * 1024 * 1024
REJECT_SOURCES = {
    1: "service user",
    2: "service provider (ACSE)",
    3: "service provider (presentation)",
}
REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class LinkError(Exception):
    """The association could not be made or broke; the message says how."""


class AssociationRejected(LinkError):
    """The peer answered A-ASSOCIATE-RJ."""


class ConnectionClosed(LinkError):
    """The peer closed the TCP connection."""


@dataclass(frozen=True)
class Part10File:
    """What a C-STORE needs from a Part 10 file's meta information."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int  # where the dataset starts: everything after it is sent as it is


@dataclass(frozen=True)
class StoreResponse:
    status: int
    error_comment: str = ""


def _uid(value: bytes) -> str:
    # UIDs are padded with NUL to even length (PS3.5 9.1); some writers pad with a space.
    return value.rstrip(b"\x00 ").decode("ascii")


def read_part10_meta(stream: BinaryIO) -> Part10File:
    """Parse the preamble and group 0002 (Explicit VR Little Endian, PS3.10 7.1)."""
    head = stream.read(len(PREAMBLE))
    if len(head) != len(PREAMBLE) or head[128:] != PREAMBLE[128:]:
        raise ValueError("not a DICOM Part 10 file (no 'DICM' after the preamble)")
    values: dict[int, bytes] = {}
    offset = len(PREAMBLE)
    while True:
        header = stream.read(8)
        if len(header) < 8:
            break  # a file with only meta information: an empty dataset
        group, element = struct.unpack_from("<HH", header)
        if group != 0x0002:
            break
        vr = header[4:6]
        if vr in LONG_VRS:
            (length,) = struct.unpack("<I", stream.read(4))
            offset += 12
        else:
            (length,) = struct.unpack_from("<H", header, 6)
            offset += 8
        values[element] = stream.read(length)
        offset += length
    try:
        return Part10File(_uid(values[0x0002]), _uid(values[0x0003]), _uid(values[0x0010]), offset)
    except KeyError as missing:
        raise ValueError(f"file meta information lacks (0002,{missing.args[0]:04X})") from None


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def associate_rq(
    called: str,
    calling: str,
    contexts: Sequence[tuple[str, str]],
    max_pdu: int,
    user_identity: UserIdentity | None = None,
) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2); context i gets ID 2i+1 (IDs are odd, PS3.8 9.3.2.2).

    user_identity (username, passcode or None) adds a User Identity sub-item
    (PS3.7 D.3.3.7) of type 2, or type 1 without a passcode.
    """
    items = [item(0x10, APPLICATION_CONTEXT_NAME)]
    for index, (abstract, transfer) in enumerate(contexts):
        sub = item(0x30, abstract.encode("ascii")) + item(0x40, transfer.encode("ascii"))
        items.append(item(0x20, bytes([2 * index + 1, 0, 0, 0]) + sub))
    user = (
        item(0x51, struct.pack(">I", max_pdu))
        + item(0x52, str(IMPLEMENTATION_CLASS_UID).encode("ascii"))
        + item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii"))
    )
    if user_identity is not None:
        user += encode_user_identity_rq(*user_identity)
    items.append(item(0x50, user))
    fixed = struct.pack(">HH", PROTOCOL_VERSION, 0) + _ae(called) + _ae(calling) + bytes(32)
    return encode_pdu(A_ASSOCIATE_RQ, fixed + b"".join(items))


def _items(data: bytes, offset: int) -> list[tuple[int, bytes]]:
    found = []
    while offset + 4 <= len(data):
        item_type, _, length = struct.unpack_from(">BBH", data, offset)
        found.append((item_type, data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return found


@dataclass(frozen=True)
class Acceptance:
    """What an A-ASSOCIATE-AC says: accepted context IDs with their syntax, the peer's max PDU."""

    syntaxes: dict[int, str]  # presentation context ID -> accepted transfer syntax
    max_pdu: int  # 0 = no limit


def parse_associate_ac(body: bytes) -> Acceptance:
    syntaxes: dict[int, str] = {}
    max_pdu = 0
    for item_type, value in _items(body, 68):  # after version, AE titles and reserved bytes
        if item_type == 0x21 and len(value) >= 4 and value[2] == 0:  # result 0 = acceptance
            transfer = [v for t, v in _items(value, 4) if t == 0x40]
            if transfer:
                syntaxes[value[0]] = _uid(transfer[0])
        elif item_type == 0x50:
            for sub_type, sub in _items(value, 0):
                if sub_type == 0x51 and len(sub) == 4:
                    (max_pdu,) = struct.unpack(">I", sub)
    return Acceptance(syntaxes, max_pdu)


def describe_reject(body: bytes) -> str:
    if len(body) < 4:
        return "rejected"
    result, source, reason = body[1], body[2], body[3]
    kind = "permanent" if result == 1 else "transient"
    why = REJECT_REASONS.get((source, reason), f"reason {reason}")
    return f"{kind}, {REJECT_SOURCES.get(source, f'source {source}')}: {why}"


class StoreAssociation:
    """One established association; used by one thread (interrupt() may come from another)."""

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        contexts: Sequence[tuple[str, str]],
        acceptance: Acceptance,
        timeouts: Timeouts,
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.timeouts = timeouts
        self.established = True
        # (SOP class, transfer syntax) -> context ID, for the accepted contexts only.
        self._contexts: dict[tuple[str, str], int] = {}
        for context_id, transfer in acceptance.syntaxes.items():
            index = (context_id - 1) // 2
            if context_id % 2 and index < len(contexts):
                self._contexts[(contexts[index][0], transfer)] = context_id
        limit = acceptance.max_pdu - 6 if acceptance.max_pdu else UNLIMITED_PDV
        self.max_pdv = max(1, min(limit, UNLIMITED_PDV))
        self._message_id = 0
        # Room for the PDU and PDV headers in front of each piece read from the file.
        self._buffer = bytearray(12 + self.max_pdv)

    def accepted(self, sop_class: str) -> set[str]:
        return {syntax for (cls, syntax) in self._contexts if cls == sop_class}

    def is_usable(self) -> bool:
        """Established, and the peer has neither closed it nor sent anything while idle
        (an A-ABORT, an A-RELEASE-RQ, EOF): a C-STORE on it would only fail."""
        if not self.established:
            return False
        if self._peer_spoke():
            self.close()
            return False
        return True

    def _peer_spoke(self) -> bool:
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        if not readable:
            return False
        if not isinstance(self.sock, ssl.SSLSocket):
            return True  # bytes or EOF: either way the peer is ending the association
        # TLS 1.3 servers send session tickets after the handshake: records, but no data.
        try:
            self.sock.settimeout(0)
            return self.sock.recv(1) is not None
        except ssl.SSLWantReadError:
            return False
        except OSError:
            return True

    def store(self, path: Path) -> StoreResponse:
        """C-STORE one Part 10 file in its own transfer syntax; raises LinkError."""
        with path.open("rb") as stream:
            file = read_part10_meta(stream)
            context_id = self._contexts.get((file.sop_class_uid, file.transfer_syntax))
            if context_id is None:
                raise ValueError(
                    f"{self.peer} accepted no context for {file.sop_class_uid}"
                    f" in {file.transfer_syntax}"
                )
            self._message_id = self._message_id % 0xFFFF + 1
            message_id = self._message_id
            with self._phase(self.timeouts.network, f"sending to {self.peer}"):
                self._send_command(
                    context_id,
                    encode_store_request(message_id, file.sop_class_uid, file.sop_instance_uid),
                )
                self._send_dataset(context_id, stream, file.dataset_offset)
            with self._phase(
                self.timeouts.dimse, f"waiting for the C-STORE response from {self.peer}"
            ):
                return self._response(message_id)

    @contextlib.contextmanager
    def _phase(self, timeout: float, what: str) -> Iterator[None]:
        """One step of a C-STORE under a socket timeout: any failure ends the association,
        since the peer and we no longer agree on where the byte stream is."""
        self.sock.settimeout(timeout)
        try:
            yield
        except TimeoutError:
            self.abort()
            raise LinkError(f"{what}: nothing for {timeout:g} s") from None
        except OSError as exc:
            self.close()
            raise LinkError(f"{what} failed: {exc}") from None
        except LinkError:
            self.close()
            raise

    def _send_command(self, context_id: int, command: bytes) -> None:
        self.sock.sendall(encode_command_pdu(context_id, command))

    def _send_dataset(self, context_id: int, stream: BufferedReader, offset: int) -> None:
        """Stream the dataset from the file in P-DATA-TF PDUs of one PDV each."""
        stream.seek(0, 2)
        remaining = stream.tell() - offset
        stream.seek(offset)
        view = memoryview(self._buffer)
        while True:
            size = min(remaining, self.max_pdv)
            read = stream.readinto(view[12 : 12 + size]) if size else 0
            if read != size:
                raise LinkError(f"file shrank while sending it to {self.peer}")
            remaining -= size
            control = LAST if remaining == 0 else 0
            struct.pack_into(
                ">BBIIBB", view, 0, P_DATA_TF, 0, size + 6, size + 2, context_id, control
            )
            self.sock.sendall(view[: 12 + size])
            if remaining == 0:
                return

    def _response(self, message_id: int) -> StoreResponse:
        """Wait for the C-STORE-RSP to message_id: its command set, in as many PDVs as it takes."""
        command = bytearray()
        while True:
            pdu_type, body = self._receive_pdu()
            if pdu_type != P_DATA_TF:
                self._unexpected(pdu_type, body)
            for control, data in _pdvs(body):
                if not control & COMMAND:
                    self.abort()
                    raise LinkError(f"{self.peer} sent a dataset with its C-STORE response")
                command += data
                if control & LAST:
                    return self._store_response(bytes(command), message_id)

    def _store_response(self, command: bytes, message_id: int) -> StoreResponse:
        try:
            values = command_elements(command)
        except CommandError as exc:
            self.abort()
            raise LinkError(f"{self.peer} sent a malformed command set: {exc}") from None
        field = us_value(values.get(dimse.COMMAND_FIELD))
        answered = us_value(values.get(dimse.MESSAGE_ID_BEING_RESPONDED_TO))
        status = us_value(values.get(dimse.STATUS))
        if field != dimse.C_STORE_RSP or answered != message_id or status is None:
            self.abort()
            raise LinkError(
                f"{self.peer} sent an unexpected message (command 0x{field or 0:04X},"
                f" answering {answered}) instead of the C-STORE response to {message_id}"
            )
        comment = text_value(values.get(dimse.ERROR_COMMENT))
        return StoreResponse(status, comment)

    def _unexpected(self, pdu_type: int, body: bytes) -> None:
        if pdu_type == A_ABORT:
            self.close()
            raise LinkError(f"association aborted by {self.peer}")
        if pdu_type == A_RELEASE_RQ:
            # The peer ends the association while we wait: answer politely, then report it.
            with contextlib.suppress(OSError):
                self.sock.sendall(encode_release_rp())
            self.close()
            raise LinkError(f"{self.peer} released the association before answering")
        self.abort()
        raise LinkError(f"{self.peer} sent an unexpected PDU (type 0x{pdu_type:02X})")

    def _receive_pdu(self) -> tuple[int, bytes]:
        header = _receive_exactly(self.sock, 6, self.peer)
        pdu_type, _, length = struct.unpack(">BBI", header)
        if length > MAX_INCOMING_PDU:
            self.abort()
            raise LinkError(f"{self.peer} sent a PDU of {length} bytes")
        return pdu_type, _receive_exactly(self.sock, length, self.peer)

    def release(self) -> None:
        """A-RELEASE-RQ, wait for the A-RELEASE-RP (acse timeout), close. Never raises."""
        if not self.established:
            return
        try:
            self.sock.settimeout(self.timeouts.acse)
            self.sock.sendall(encode_release_rq())
            while True:
                pdu_type, _ = self._receive_pdu()
                if pdu_type == A_RELEASE_RQ:  # release collision (PS3.8 7.2.2): answer it too
                    self.sock.sendall(encode_release_rp())
                if pdu_type in (A_RELEASE_RP, A_ABORT):
                    break
        except (OSError, LinkError):
            pass
        self.close()

    def abort(self) -> None:
        """A-ABORT (source: service user), then close. Never raises."""
        if self.established:
            with contextlib.suppress(OSError):
                self.sock.settimeout(1.0)
                self.sock.sendall(encode_abort(SERVICE_USER))
        self.close()

    def interrupt(self) -> None:
        """From another thread: cut the connection, waking a store() waiting for its answer.
        No A-ABORT bytes: they could land in the middle of a PDU being sent."""
        self.established = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.established = False
        with contextlib.suppress(OSError):
            self.sock.close()


def _pdvs(body: bytes) -> list[tuple[int, bytes]]:
    """(message control header, data) of each PDV item in a P-DATA-TF body."""
    found = []
    offset = 0
    while offset + 6 <= len(body):
        (length,) = struct.unpack_from(">I", body, offset)
        if length < 2 or offset + 4 + length > len(body):
            raise LinkError("malformed P-DATA-TF PDU")
        found.append((body[offset + 5], body[offset + 6 : offset + 4 + length]))
        offset += 4 + length
    return found


def _receive_exactly(sock: socket.socket, size: int, peer: str) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:])
        if count == 0:
            raise ConnectionClosed(f"connection closed by {peer}")
        received += count
    return bytes(buffer)


@dataclass(frozen=True)
class Timeouts:
    acse: float  # connecting and association set-up / release
    dimse: float  # waiting for a C-STORE response
    network: float  # a send that makes no progress


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def associate(
    peer: Peer,
    calling_ae_title: str,
    contexts: Sequence[tuple[str, str]],
    *,
    max_pdu: int,
    timeouts: Timeouts,
    tls: tuple[ssl.SSLContext, str] | None = None,
    user_identity: UserIdentity | None = None,
) -> StoreAssociation:
    """Connect and negotiate; contexts are (SOP class, transfer syntax) pairs, one per context."""
    sock = _connect(peer, timeouts.acse, tls)
    try:
        request = associate_rq(peer.ae_title, calling_ae_title, contexts, max_pdu, user_identity)
        sock.sendall(request)
        pdu_type, body = _read_negotiation(sock, str(peer), timeouts.acse)
    except BaseException:
        sock.close()
        raise
    if pdu_type == A_ASSOCIATE_AC:
        return StoreAssociation(sock, str(peer), contexts, parse_associate_ac(body), timeouts)
    sock.close()
    if pdu_type == A_ASSOCIATE_RJ:
        raise AssociationRejected(f"association rejected by {peer} ({describe_reject(body)})")
    if pdu_type == A_ABORT:
        raise LinkError(f"association aborted by {peer}")
    raise LinkError(f"{peer} answered the association request with PDU type 0x{pdu_type:02X}")


def _connect(peer: Peer, timeout: float, tls: tuple[ssl.SSLContext, str] | None) -> socket.socket:
    try:
        sock = socket.create_connection((peer.host, peer.port), timeout=timeout)
    except OSError as exc:
        raise LinkError(f"cannot connect to {peer}: {exc}") from None
    # Without it a C-STORE request waits for the peer's delayed ACK (about 40 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is None:
        return sock
    context, server_hostname = tls
    try:
        return context.wrap_socket(sock, server_hostname=server_hostname)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise LinkError(f"cannot connect to {peer}: TLS: {exc}") from None


def _read_negotiation(sock: socket.socket, peer: str, timeout: float) -> tuple[int, bytes]:
    try:
        header = _receive_exactly(sock, 6, peer)
        pdu_type, _, length = struct.unpack(">BBI", header)
        if length > MAX_INCOMING_PDU:
            raise LinkError(f"{peer} sent a PDU of {length} bytes")
        return pdu_type, _receive_exactly(sock, length, peer)
    except TimeoutError:
        raise LinkError(f"no association with {peer}: no answer within {timeout:g} s") from None
    except ConnectionClosed:
        raise LinkError(f"association aborted by {peer} (connection closed)") from None
    except OSError as exc:
        raise LinkError(f"cannot connect to {peer}: {exc}") from None
