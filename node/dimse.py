"""DIMSE command sets (PS3.7 section 9 and annex E) for the services the node provides.

A command set is a handful of group 0000 elements in Implicit VR Little Endian.
Decoding one with pydicom costs more than the rest of a C-STORE's bookkeeping,
so both directions are done here with struct, for exactly the elements C-ECHO
and C-STORE use.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
RESPONSE_BIT = 0x8000
NO_DATASET = 0x0101

# Status 0x0211: Unrecognized Operation (PS3.7 C.5.6), for commands we do not provide.
UNRECOGNIZED_OPERATION = 0x0211
ERROR_COMMENT_MAX = 64  # (0000,0902) is LO

_ELEMENT = struct.Struct("<HHL")  # group, element, value length
_US = struct.Struct("<H")

AFFECTED_SOP_CLASS_UID = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
COMMAND_DATASET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000
MOVE_ORIGINATOR_AE_TITLE = 0x1030


class CommandError(Exception):
    """The command set cannot be decoded or lacks a required element."""


@dataclass(frozen=True)
class Command:
    """A request's command set, as far as the node acts on it."""

    command_field: int
    message_id: int
    has_dataset: bool
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    move_originator_ae_title: str = ""

    @property
    def name(self) -> str:
        return {C_STORE_RQ: "C-STORE-RQ", C_ECHO_RQ: "C-ECHO-RQ"}.get(
            self.command_field, f"command 0x{self.command_field:04X}"
        )


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    elements = _elements(memoryview(data))
    try:
        command_field = _us(elements[COMMAND_FIELD])
        message_id = _us(elements[MESSAGE_ID])
        dataset_type = _us(elements[COMMAND_DATASET_TYPE])
    except KeyError as exc:
        raise CommandError(f"the command set lacks (0000,{exc.args[0]:04X})") from None
    return Command(
        command_field=command_field,
        message_id=message_id,
        has_dataset=dataset_type != NO_DATASET,
        affected_sop_class_uid=_text(elements.get(AFFECTED_SOP_CLASS_UID)),
        affected_sop_instance_uid=_text(elements.get(AFFECTED_SOP_INSTANCE_UID)),
        move_originator_ae_title=_text(elements.get(MOVE_ORIGINATOR_AE_TITLE)),
    )


def encode_response(request: Command, status: int, error_comment: str = "") -> bytes:
    """The response command set to `request`, with `status` (no dataset follows)."""
    elements = []
    if request.affected_sop_class_uid:
        elements.append(_uid(AFFECTED_SOP_CLASS_UID, request.affected_sop_class_uid))
    elements.append(_ushort(COMMAND_FIELD, request.command_field | RESPONSE_BIT))
    elements.append(_ushort(MESSAGE_ID_BEING_RESPONDED_TO, request.message_id))
    elements.append(_ushort(COMMAND_DATASET_TYPE, NO_DATASET))
    elements.append(_ushort(STATUS, status))
    if error_comment and status not in (0x0000,):
        elements.append(_text_element(ERROR_COMMENT, error_comment[:ERROR_COMMENT_MAX]))
    if request.affected_sop_instance_uid:
        elements.append(_uid(AFFECTED_SOP_INSTANCE_UID, request.affected_sop_instance_uid))
    body = b"".join(elements)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<L", len(body)) + body


def _elements(data: memoryview) -> dict[int, memoryview]:
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
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return _ELEMENT.pack(0, element, len(value)) + value


def _text_element(element: int, text: str) -> bytes:
    value = text.encode("ascii", errors="replace")
    if len(value) % 2:
        value += b" "
    return _ELEMENT.pack(0, element, len(value)) + value
