"""DIMSE command sets (PS3.7 section 9 and annex E) for the services the node provides.

A command set is a handful of group 0000 elements in Implicit VR Little Endian.
Decoding one with pydicom costs more than the rest of a C-STORE's bookkeeping,
so both directions are done here with struct, for exactly the elements C-ECHO,
C-STORE, C-CANCEL, N-ACTION and N-EVENT-REPORT (Storage Commitment, PS3.4 J) use.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
# C-CANCEL-RQ (PS3.7 9.3.2.3) carries Message ID Being Responded To, not a Message ID of its
# own, and is never answered.
C_CANCEL_RQ = 0x0FFF
N_EVENT_REPORT_RQ = 0x0100
N_ACTION_RQ = 0x0130
RESPONSE_BIT = 0x8000
N_EVENT_REPORT_RSP = N_EVENT_REPORT_RQ | RESPONSE_BIT
N_ACTION_RSP = N_ACTION_RQ | RESPONSE_BIT
VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (PS3.4 A)
C_STORE_RSP = C_STORE_RQ | RESPONSE_BIT
C_ECHO_RSP = C_ECHO_RQ | RESPONSE_BIT
NO_DATASET = 0x0101

REQUEST_NAMES = {
    C_STORE_RQ: "C-STORE-RQ",
    0x0010: "C-GET-RQ",
    0x0020: "C-FIND-RQ",
    0x0021: "C-MOVE-RQ",
    C_ECHO_RQ: "C-ECHO-RQ",
    0x0100: "N-EVENT-REPORT-RQ",
    0x0110: "N-GET-RQ",
    0x0120: "N-SET-RQ",
    0x0130: "N-ACTION-RQ",
    0x0140: "N-CREATE-RQ",
    0x0150: "N-DELETE-RQ",
    C_CANCEL_RQ: "C-CANCEL-RQ",
}

# Statuses the protocol layer answers by itself (PS3.7 annex C, PS3.4 B.2.3).
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported
UNRECOGNIZED_OPERATION = 0x0211  # for commands we do not provide
PROCESSING_FAILURE = 0x0110  # N-ACTION and N-EVENT-REPORT (PS3.7 annex C)
CANNOT_UNDERSTAND = 0xC210  # Error: Cannot understand (C-STORE's Cxxx range)
ERROR_COMMENT_MAX = 64  # (0000,0902) is LO


def error_comment_value(reason: str) -> str:
    """A reason as one LO value: at most 64 characters, no backslash (LO's value separator)."""
    return reason.replace("\\", "/")[:ERROR_COMMENT_MAX]


_ELEMENT = struct.Struct("<HHL")  # group, element, value length
_US = struct.Struct("<H")

AFFECTED_SOP_CLASS_UID = 0x0002
REQUESTED_SOP_CLASS_UID = 0x0003
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
PRIORITY = 0x0700
COMMAND_DATASET_TYPE = 0x0800
STATUS = 0x0900
OFFENDING_ELEMENT = 0x0901
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000
REQUESTED_SOP_INSTANCE_UID = 0x1001
EVENT_TYPE_ID = 0x1002
ACTION_TYPE_ID = 0x1008
MOVE_ORIGINATOR_AE_TITLE = 0x1030


class CommandError(Exception):
    """The command set cannot be decoded or lacks a required element."""


@dataclass(frozen=True)
class Command:
    """A request's command set, as far as the node acts on it."""

    command_field: int
    message_id: int  # 0 for a C-CANCEL-RQ, which has none
    has_dataset: bool
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    move_originator_ae_title: str = ""
    message_id_being_responded_to: int | None = None  # a C-CANCEL-RQ's or a response's
    requested_sop_class_uid: str = ""  # N-ACTION
    requested_sop_instance_uid: str = ""
    event_type_id: int | None = None  # N-EVENT-REPORT
    action_type_id: int | None = None  # N-ACTION
    status: int | None = None  # responses only

    @property
    def name(self) -> str:
        if self.is_response:
            request = REQUEST_NAMES.get(self.command_field & ~RESPONSE_BIT, "")
            return request.replace("-RQ", "-RSP") or f"command 0x{self.command_field:04X}"
        return REQUEST_NAMES.get(self.command_field, f"command 0x{self.command_field:04X}")

    @property
    def is_response(self) -> bool:
        return bool(self.command_field & RESPONSE_BIT) and self.command_field != C_CANCEL_RQ

    @property
    def sop_class_uid(self) -> str:
        """The SOP Class the message is about: Affected (C-, N-EVENT-REPORT) or Requested (N-ACTION)."""
        return self.affected_sop_class_uid or self.requested_sop_class_uid

    @property
    def sop_instance_uid(self) -> str:
        return self.affected_sop_instance_uid or self.requested_sop_instance_uid


@dataclass(frozen=True)
class Answer:
    """What a response says: its status and the status's related fields."""

    status: int
    error_comment: str = ""
    offending_elements: tuple[int, ...] = ()  # command elements, by element number


def store_refusal(
    command: Command, has_dataset: bool, abstract_syntax: str | None, context_id: int
) -> Answer | None:
    """Why a C-STORE-RQ is not a storage request at all, before anything looks at its data set.

    `abstract_syntax` is that of the presentation context the request came on. Shared by
    both acceptors, so they answer the same.
    """
    if not has_dataset:
        # PS3.7 9.1.1.1: a C-STORE's Data Set is mandatory. pynetdicom's storescp answers
        # 0xC210 too (its handler cannot decode the missing data set); storescp A-ABORTs.
        return Answer(
            CANNOT_UNDERSTAND,
            "C-STORE-RQ without a data set (Command Data Set Type 0101H)",
            (COMMAND_DATASET_TYPE,),
        )
    if not command.affected_sop_class_uid:
        return Answer(
            CANNOT_UNDERSTAND,
            "C-STORE-RQ without an Affected SOP Class UID",
            (AFFECTED_SOP_CLASS_UID,),
        )
    if command.affected_sop_class_uid != abstract_syntax:
        # The SOP Class was not agreed on this presentation context: "Refused: SOP Class not
        # supported" (PS3.7 annex C, 0122H). Storing it anyway would let a peer bypass the
        # negotiation's refusals. The data set may match its SOP Class perfectly, so 0xA900
        # (data set does not match SOP Class) would mislead.
        return Answer(
            SOP_CLASS_NOT_SUPPORTED,
            f"SOP Class {command.affected_sop_class_uid} not negotiated on context {context_id}",
        )
    return None


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    elements = command_elements(data)
    try:
        command_field = _us(elements[COMMAND_FIELD])
        if command_field == C_CANCEL_RQ or command_field & RESPONSE_BIT:
            message_id = 0
            responded_to: int | None = _us(elements[MESSAGE_ID_BEING_RESPONDED_TO])
        else:
            message_id = _us(elements[MESSAGE_ID])
            responded_to = None
        dataset_type = _us(elements[COMMAND_DATASET_TYPE])
    except KeyError as exc:
        raise CommandError(f"the command set lacks (0000,{exc.args[0]:04X})") from None
    return Command(
        command_field=command_field,
        message_id=message_id,
        message_id_being_responded_to=responded_to,
        has_dataset=dataset_type != NO_DATASET,
        affected_sop_class_uid=_text(elements.get(AFFECTED_SOP_CLASS_UID)),
        affected_sop_instance_uid=_text(elements.get(AFFECTED_SOP_INSTANCE_UID)),
        move_originator_ae_title=_text(elements.get(MOVE_ORIGINATOR_AE_TITLE)),
        requested_sop_class_uid=_text(elements.get(REQUESTED_SOP_CLASS_UID)),
        requested_sop_instance_uid=_text(elements.get(REQUESTED_SOP_INSTANCE_UID)),
        event_type_id=us_value(elements.get(EVENT_TYPE_ID)),
        action_type_id=us_value(elements.get(ACTION_TYPE_ID)),
        status=us_value(elements.get(STATUS)),
    )


def encode_store_request(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ command set (medium priority; a dataset follows)."""
    body = b"".join(
        (
            _uid(AFFECTED_SOP_CLASS_UID, sop_class_uid),
            _ushort(COMMAND_FIELD, C_STORE_RQ),
            _ushort(MESSAGE_ID, message_id),
            _ushort(PRIORITY, 0x0000),
            _ushort(COMMAND_DATASET_TYPE, 0x0000),  # anything but 0x0101: a dataset follows
            _uid(AFFECTED_SOP_INSTANCE_UID, sop_instance_uid),
        )
    )
    return _with_group_length(body)


def encode_echo_request(message_id: int, sop_class_uid: str) -> bytes:
    """A C-ECHO-RQ command set (no dataset)."""
    body = b"".join(
        (
            _uid(AFFECTED_SOP_CLASS_UID, sop_class_uid),
            _ushort(COMMAND_FIELD, C_ECHO_RQ),
            _ushort(MESSAGE_ID, message_id),
            _ushort(COMMAND_DATASET_TYPE, NO_DATASET),
        )
    )
    return _with_group_length(body)


def encode_action_request(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, action_type_id: int
) -> bytes:
    """An N-ACTION-RQ command set (PS3.7 10.3.4); its action information data set follows."""
    body = b"".join(
        (
            _uid(REQUESTED_SOP_CLASS_UID, sop_class_uid),
            _ushort(COMMAND_FIELD, N_ACTION_RQ),
            _ushort(MESSAGE_ID, message_id),
            _ushort(COMMAND_DATASET_TYPE, 0x0000),
            _uid(REQUESTED_SOP_INSTANCE_UID, sop_instance_uid),
            _ushort(ACTION_TYPE_ID, action_type_id),
        )
    )
    return _with_group_length(body)


def encode_event_report_request(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, event_type_id: int
) -> bytes:
    """An N-EVENT-REPORT-RQ command set (PS3.7 10.3.1); its event information data set follows."""
    body = b"".join(
        (
            _uid(AFFECTED_SOP_CLASS_UID, sop_class_uid),
            _ushort(COMMAND_FIELD, N_EVENT_REPORT_RQ),
            _ushort(MESSAGE_ID, message_id),
            _ushort(COMMAND_DATASET_TYPE, 0x0000),
            _uid(AFFECTED_SOP_INSTANCE_UID, sop_instance_uid),
            _ushort(EVENT_TYPE_ID, event_type_id),
        )
    )
    return _with_group_length(body)


def encode_response(
    request: Command,
    status: int,
    error_comment: str = "",
    offending_elements: tuple[int, ...] = (),
) -> bytes:
    """The response command set to `request`, with `status` (no dataset follows).

    `offending_elements` are command elements (group 0000, by element number) that
    Offending Element (0000,0901) names, as PS3.4 B.2.3 allows for a Cxxx status.
    """
    elements = []
    # An N-ACTION-RSP names the Requested SOP Class and Instance as Affected (PS3.7 10.3.4).
    if request.sop_class_uid:
        elements.append(_uid(AFFECTED_SOP_CLASS_UID, request.sop_class_uid))
    elements.append(_ushort(COMMAND_FIELD, request.command_field | RESPONSE_BIT))
    elements.append(_ushort(MESSAGE_ID_BEING_RESPONDED_TO, request.message_id))
    elements.append(_ushort(COMMAND_DATASET_TYPE, NO_DATASET))
    elements.append(_ushort(STATUS, status))
    if offending_elements:
        tags = b"".join(_US.pack(0) + _US.pack(element) for element in offending_elements)
        elements.append(_ELEMENT.pack(0, OFFENDING_ELEMENT, len(tags)) + tags)
    if error_comment and status not in (0x0000,):
        elements.append(_text_element(ERROR_COMMENT, error_comment_value(error_comment)))
    if request.sop_instance_uid:
        elements.append(_uid(AFFECTED_SOP_INSTANCE_UID, request.sop_instance_uid))
    if request.event_type_id is not None:
        elements.append(_ushort(EVENT_TYPE_ID, request.event_type_id))
    if request.action_type_id is not None and status == 0x0000:
        elements.append(_ushort(ACTION_TYPE_ID, request.action_type_id))
    return _with_group_length(b"".join(elements))


def _with_group_length(body: bytes) -> bytes:
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<L", len(body)) + body


def command_elements(data: bytes | bytearray | memoryview) -> dict[int, memoryview]:
    """The elements of a command set, by element number; raises CommandError if malformed."""
    data = memoryview(data)
    elements: dict[int, memoryview] = {}
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise CommandError("the command set ends inside an element header")
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0 or offset + length > len(data):
            raise CommandError(f"invalid command element ({group:04X},{element:04X})")
        elements[element] = data[offset : offset + length]
        offset += length
    return elements


def us_value(value: memoryview | None) -> int | None:
    """A US element's value, or None if it is absent or not 2 bytes long."""
    return int(_US.unpack(value)[0]) if value is not None and len(value) == 2 else None


def text_value(value: memoryview | None) -> str:
    """A UI/AE/LO element's value without its padding."""
    return _text(value)


def _us(value: memoryview) -> int:
    if len(value) != 2:
        raise CommandError("a US command element is not 2 bytes long")
    return int(_US.unpack(value)[0])


def _text(value: memoryview | None) -> str:
    if value is None:
        return ""
    return bytes(value).rstrip(b"\0 ").decode("ascii", errors="replace").strip()


def _ushort(element: int, value: int) -> bytes:
    return _ELEMENT.pack(0, element, 2) + _US.pack(value)


def _uid(element: int, uid: str) -> bytes:
    value = uid.encode("ascii", errors="replace")  # echoes a peer's UID, which may be garbage
    if len(value) % 2:
        value += b"\0"
    return _ELEMENT.pack(0, element, len(value)) + value


def _text_element(element: int, text: str) -> bytes:
    value = text.encode("ascii", errors="replace")
    if len(value) % 2:
        value += b" "
    return _ELEMENT.pack(0, element, len(value)) + value
