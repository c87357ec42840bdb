"""Upper Layer PDUs (PS3.8 section 9.3): the bodies both ends of an association read and write.

The byte layout of each PDU, for the acceptor and the requestor alike; when a
PDU may come, and how P-DATA-TF carries messages, is node.net.ul's job.
Only the association request is decoded with pynetdicom's PDU classes: it happens
once per association and has many optional items. Everything on the per-message
path (P-DATA-TF, A-RELEASE, A-ABORT) and every PDU we send is a few struct calls.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pynetdicom.pdu import A_ASSOCIATE_RQ as _AssociateRQDecoder
from pynetdicom.pdu_primitives import (
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_TYPES = frozenset(range(A_ASSOCIATE_RQ, A_ABORT + 1))

HEADER = struct.Struct(">BxL")  # PDU type, reserved, length
PDV_HEADER = struct.Struct(">LBB")  # item length, presentation context ID, message control header
PDV_HEADER_SIZE = PDV_HEADER.size

APPLICATION_CONTEXT_NAME = b"1.2.840.10008.3.1.1.1"
PROTOCOL_VERSION = 1
# PS3.8 9.3.2.2: presentation context IDs are the odd numbers 1..255.
MAX_PRESENTATION_CONTEXTS = 128
# A-ASSOCIATE-RJ source and diagnostic (PS3.8 9.3.4), for people reading a log.
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
# A-ABORT source and reason (PS3.8 9.3.8)
SERVICE_PROVIDER = 0x02
SERVICE_USER = 0x00
REASON_NOT_SPECIFIED = 0x00
UNRECOGNIZED_PDU = 0x01
UNEXPECTED_PDU = 0x02
INVALID_PDU_PARAMETER = 0x06
# User Information sub-items (PS3.7 Annex D.3.3)
ROLE_SELECTION_ITEM = 0x54
USER_IDENTITY_RQ_ITEM = 0x58
USER_IDENTITY_AC_ITEM = 0x59


class PDUError(Exception):
    """The peer sent something that is not a valid PDU here; the association is aborted."""

    def __init__(self, message: str, reason: int = REASON_NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class UserIdentity:
    """The User Identity sub-item of an A-ASSOCIATE-RQ (PS3.7 D.3.3.7.1)."""

    identity_type: int  # 1 username, 2 username and passcode, 3 Kerberos, 4 SAML, 5 JWT
    positive_response_requested: bool
    primary: bytes  # the username (types 1 and 2)
    secondary: bytes = b""  # the passcode (type 2): never log it


@dataclass(frozen=True)
class AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ the acceptor acts on."""

    calling_ae_title: str
    called_ae_title: str
    contexts: list[PresentationContext]
    max_pdu: int  # the requestor's Maximum Length Received; 0 is unlimited
    raw_called: bytes  # the 16 bytes as sent, returned unchanged in the A-ASSOCIATE-AC
    raw_calling: bytes
    # SCP/SCU Role Selection (PS3.7 D.3.3.4): SOP Class UID -> (SCU role, SCP role) proposed
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    user_identity: UserIdentity | None = None


def decode_associate_rq(pdu: bytes) -> AssociateRequest:
    """Decode a whole A-ASSOCIATE-RQ PDU (header included)."""
    if len(pdu) < 74:
        raise PDUError("A-ASSOCIATE-RQ shorter than its fixed fields", INVALID_PDU_PARAMETER)
    try:
        decoder = _AssociateRQDecoder()
        decoder.decode(pdu)
        primitive = decoder.to_primitive()
    except Exception as exc:  # pynetdicom raises whatever its item parsers hit
        raise PDUError(f"A-ASSOCIATE-RQ cannot be decoded: {exc}", INVALID_PDU_PARAMETER) from exc
    max_pdu = 0
    roles: dict[str, tuple[bool, bool]] = {}
    identity = None
    for item in primitive.user_information:
        if isinstance(item, MaximumLengthNotification):
            max_pdu = item.maximum_length_received or 0
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
            roles[str(item.sop_class_uid)] = (bool(item.scu_role), bool(item.scp_role))
        elif isinstance(item, UserIdentityNegotiation) and item.user_identity_type:
            identity = UserIdentity(
                identity_type=int(item.user_identity_type),
                positive_response_requested=bool(item.positive_response_requested),
                primary=bytes(item.primary_field or b""),
                secondary=bytes(item.secondary_field or b""),
            )
    return AssociateRequest(
        calling_ae_title=str(primitive.calling_ae_title).strip(),
        called_ae_title=str(primitive.called_ae_title).strip(),
        contexts=list(primitive.presentation_context_definition_list),
        max_pdu=max_pdu,
        raw_called=bytes(pdu[10:26]),
        raw_calling=bytes(pdu[26:42]),
        roles=roles,
        user_identity=identity,
    )


@dataclass(frozen=True)
class ContextResult:
    """One presentation context's answer in the A-ASSOCIATE-AC."""

    context_id: int
    result: (
        int  # 0 acceptance, 1 user rejection, 2 no reason, 3 abstract syntax, 4 transfer syntaxes
    )
    transfer_syntax: str
    abstract_syntax: str = ""
    # The SCP/SCU Role Selection reply for this context's SOP class, (SCU role, SCP role)
    # of the requestor; None: the requestor proposed none, so none is sent.
    role: tuple[bool, bool] | None = None


def encode_associate_ac(
    request: AssociateRequest,
    results: Iterable[ContextResult],
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version_name: str,
    user_identity_response: bytes | None = None,
) -> bytes:
    """user_identity_response: the Server-response of a positive User Identity reply, if any."""
    items = [item(0x10, APPLICATION_CONTEXT_NAME)]
    roles: dict[str, tuple[bool, bool]] = {}
    for context in results:
        syntax = item(0x40, context.transfer_syntax.encode("ascii"))
        fields = struct.pack(">BxBx", context.context_id, context.result)
        items.append(item(0x21, fields + syntax))
        if context.result == 0 and context.role is not None and context.abstract_syntax:
            roles.setdefault(context.abstract_syntax, context.role)
    user = (
        item(0x51, struct.pack(">L", max_pdu))
        + item(0x52, implementation_class_uid.encode("ascii"))
        + b"".join(encode_role_item(uid, *role) for uid, role in roles.items())
        + item(0x55, implementation_version_name.encode("ascii")[:16])
    )
    if user_identity_response is not None:
        response = struct.pack(">H", len(user_identity_response)) + user_identity_response
        user += item(USER_IDENTITY_AC_ITEM, response)
    items.append(item(0x50, user))
    body = (
        struct.pack(">H2x", 1)  # protocol version 1
        + request.raw_called
        + request.raw_calling
        + bytes(32)
        + b"".join(items)
    )
    return encode_pdu(A_ASSOCIATE_AC, body)


def encode_role_item(sop_class_uid: str, scu_role: bool, scp_role: bool) -> bytes:
    """SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4), the same in RQ and AC."""
    uid = sop_class_uid.encode("ascii")
    return item(
        ROLE_SELECTION_ITEM, struct.pack(">H", len(uid)) + uid + bytes([scu_role, scp_role])
    )


def encode_user_identity_rq(
    username: str, passcode: bytes | None, positive_response_requested: bool = False
) -> bytes:
    """User Identity sub-item of an A-ASSOCIATE-RQ: type 2 with a passcode, else type 1."""
    primary = username.encode("utf-8")
    identity_type = 2 if passcode is not None else 1
    secondary = passcode or b""
    value = (
        struct.pack(">BBH", identity_type, positive_response_requested, len(primary))
        + primary
        + struct.pack(">H", len(secondary))
        + secondary
    )
    return item(USER_IDENTITY_RQ_ITEM, value)


def encode_associate_rq(
    called: str,
    calling: str,
    contexts: Sequence[tuple[str, str]],
    max_pdu: int,
    implementation: tuple[str, str],
    user_identity: tuple[str, bytes | None] | None = None,
    roles: Sequence[tuple[str, bool, bool]] = (),
) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2); context i gets ID 2i+1 (IDs are odd, PS3.8 9.3.2.2).

    roles: SCP/SCU Role Selection sub-items, (SOP Class UID, SCU role, SCP role) of ours.

    contexts: (abstract syntax, transfer syntax), one transfer syntax per context.
    implementation: our Implementation Class UID and Version Name.
    user_identity (username, passcode or None) adds a User Identity sub-item
    (PS3.7 D.3.3.7) of type 2, or type 1 without a passcode.
    """
    items = [item(0x10, APPLICATION_CONTEXT_NAME)]
    for index, (abstract, transfer) in enumerate(contexts):
        sub = item(0x30, abstract.encode("ascii")) + item(0x40, transfer.encode("ascii"))
        items.append(item(0x20, bytes([2 * index + 1, 0, 0, 0]) + sub))
    class_uid, version_name = implementation
    user = (
        item(0x51, struct.pack(">I", max_pdu))
        + item(0x52, class_uid.encode("ascii"))
        + b"".join(encode_role_item(uid, scu, scp) for uid, scu, scp in roles)
        + item(0x55, version_name.encode("ascii"))
    )
    if user_identity is not None:
        user += encode_user_identity_rq(*user_identity)
    items.append(item(0x50, user))
    fixed = struct.pack(">HH", PROTOCOL_VERSION, 0) + _ae(called) + _ae(calling) + bytes(32)
    return encode_pdu(A_ASSOCIATE_RQ, fixed + b"".join(items))


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


@dataclass(frozen=True)
class Acceptance:
    """What an A-ASSOCIATE-AC says: accepted context IDs with their syntax, the peer's max PDU."""

    syntaxes: dict[int, str]  # presentation context ID -> accepted transfer syntax
    max_pdu: int  # 0 = no limit


def decode_associate_ac(body: bytes) -> Acceptance:
    """The A-ASSOCIATE-AC body (after the PDU header) as far as a requestor acts on it."""
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


def _items(data: bytes, offset: int) -> list[tuple[int, bytes]]:
    found = []
    while offset + 4 <= len(data):
        item_type, _, length = struct.unpack_from(">BBH", data, offset)
        found.append((item_type, data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return found


def _uid(value: bytes) -> str:
    # UIDs are padded with NUL to even length (PS3.5 9.1); some writers pad with a space.
    return value.rstrip(b"\x00 ").decode("ascii")


def describe_reject(result: int, source: int, diagnostic: int) -> str:
    """An A-ASSOCIATE-RJ's fields in words; result 0: the PDU did not say."""
    if not result:
        return "rejected"
    kind = "permanent" if result == 1 else "transient"
    why = REJECT_REASONS.get((source, diagnostic), f"reason {diagnostic}")
    return f"{kind}, {REJECT_SOURCES.get(source, f'source {source}')}: {why}"


def encode_associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    return encode_pdu(A_ASSOCIATE_RJ, struct.pack(">xBBB", result, source, diagnostic))


def encode_release_rq() -> bytes:
    return encode_pdu(A_RELEASE_RQ, bytes(4))


def encode_release_rp() -> bytes:
    return encode_pdu(A_RELEASE_RP, bytes(4))


def encode_abort(source: int = SERVICE_PROVIDER, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    """A-ABORT; an association's requestor aborting as service user passes source 0."""
    return encode_pdu(A_ABORT, struct.pack(">xxBB", source, reason))


def encode_command_pdu(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF with one PDV: a whole command set (message control: command, last)."""
    pdv = PDV_HEADER.pack(len(command) + 2, context_id, 0x03) + command
    return encode_pdu(P_DATA_TF, pdv)


def encode_dataset_pdus(context_id: int, data: bytes, peer_max_pdu: int) -> list[bytes]:
    """A small data set as P-DATA-TFs of one PDV each, within the peer's maximum PDU length
    (0: unlimited; still 4 MiB pieces). The last PDV has the last-fragment bit."""
    piece = min(peer_max_pdu - 6, 4 * 1024 * 1024) if peer_max_pdu else 4 * 1024 * 1024
    pieces = [data[start : start + piece] for start in range(0, len(data), piece)] or [b""]
    return [
        encode_pdu(
            P_DATA_TF,
            PDV_HEADER.pack(len(part) + 2, context_id, 0x02 if index == len(pieces) - 1 else 0)
            + part,
        )
        for index, part in enumerate(pieces)
    ]


def parse_header(header: bytes) -> tuple[int, int]:
    """(PDU type, length) of a 6-byte PDU header."""
    pdu_type, length = HEADER.unpack(header)
    if pdu_type not in PDU_TYPES:
        raise PDUError(f"unknown PDU type 0x{pdu_type:02X}", UNRECOGNIZED_PDU)
    return pdu_type, length


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def encode_pdu(pdu_type: int, body: bytes) -> bytes:
    return HEADER.pack(pdu_type, len(body)) + body
