"""STOW-RS (PS3.18 10.5) without I/O on the network: the request body and the answer.

The request is `multipart/related; type="application/dicom"`, one part per Part 10
file, streamed from the spool (or a derived copy) in chunks, so a batch is never
held in memory; its length is known before the first byte, so the request has a
Content-Length and needs no chunked encoding (which not every server takes).

The answer is read into one outcome per SOP Instance UID sent: the Store
Instances Response Module's Referenced SOP Sequence (0008,1199) and Failed SOP
Sequence (0008,1198) with its Failure Reason (0008,1197), in DICOM JSON
(PS3.18 F.2) or in the Native DICOM Model XML (PS3.19 A.1). What the HTTP status
means, per PS3.18 10.5.3:
- 200: every instance stored; 202: some stored, per instance by Failure Reason;
  409: none stored, per instance by Failure Reason;
- 415: the server does not take this media type (our transfer syntax): the next
  syntax is tried;
- 401, 403, 408, 429 and 5xx: the whole destination waits (a hold), nothing is
  given up;
- any other 3xx or 4xx: refused for good (a dead letter), after the instances of a
  multi-instance request were sent one by one, so one bad instance does not take
  the others with it.
"""

from __future__ import annotations

import json
import secrets
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from http import HTTPStatus
from pathlib import Path
from typing import Any

from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

MEDIA_TYPE = "application/dicom"
ACCEPT = "application/dicom+json, application/dicom+xml;q=0.9, application/json;q=0.5"
READ_SIZE = 1 << 20  # bytes of a file read at a time while streaming the body

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"

# Failure Reasons (PS3.18 10.5.3.3, statuses of PS3.4 B.2.3)
SYNTAX_NOT_SUPPORTED = 0xC122  # Referenced Transfer Syntax not supported
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111

REASON_NAMES = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class (warning)",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}

# Statuses after which the whole destination waits: it is down, busy or refuses us.
HOLD_STATUSES = frozenset({401, 403, 407, 408, 429})


class Verdict(StrEnum):
    """What the answer means for one instance (the forwarder's verdicts, plus two of STOW's)."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REFUSED = "refused"  # permanent: a dead letter
    NEXT_SYNTAX = "next syntax"  # the server refused this transfer syntax: try the next
    ALONE = "alone"  # refused with others, for no stated reason: send it on its own


class BodyChanged(OSError):
    """A file of the body was not the size it had when the body was measured."""


class ResponseError(ValueError):
    """A response body that is not a Store Instances Response in JSON or XML."""


@dataclass(frozen=True)
class Part:
    path: Path
    size: int


class MultipartBody:
    """The multipart/related body of one STOW-RS request, measured, then streamed."""

    def __init__(self, paths: Sequence[Path], boundary: str | None = None) -> None:
        # 128 random bits: the chance that a part contains the delimiter is negligible.
        self.boundary = boundary or f"dicom-node-{secrets.token_hex(16)}"
        self.parts = [Part(path, path.stat().st_size) for path in paths]
        self._head = f"--{self.boundary}\r\nContent-Type: {MEDIA_TYPE}\r\n\r\n".encode()
        self._close = f"--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{MEDIA_TYPE}"; boundary={self.boundary}'

    def __len__(self) -> int:
        framing = len(self._head) + len(b"\r\n")
        return sum(part.size + framing for part in self.parts) + len(self._close)

    def chunks(self, read_size: int = READ_SIZE) -> Iterator[bytes]:
        """The body, exactly len(self) bytes; raises BodyChanged rather than send other bytes."""
        for part in self.parts:
            yield self._head
            yield from _file_chunks(part, read_size)
            yield b"\r\n"
        yield self._close


def _file_chunks(part: Part, read_size: int) -> Iterator[bytes]:
    left = part.size
    with part.path.open("rb") as handle:
        while left > 0:
            chunk = handle.read(min(read_size, left))
            if not chunk:
                raise BodyChanged(f"{part.path} ended {left} bytes early")
            left -= len(chunk)
            yield chunk
        if handle.read(1):
            raise BodyChanged(f"{part.path} grew after the request was measured")


@dataclass(frozen=True)
class StoreResponse:
    """The Store Instances Response Module: per SOP Instance UID, a reason or None."""

    referenced: Mapping[str, int | None] = field(default_factory=dict)  # Warning Reason
    failed: Mapping[str, int | None] = field(default_factory=dict)  # Failure Reason


def parse_response(content_type: str, body: bytes) -> StoreResponse:
    """The response body, DICOM JSON or XML by its media type; an empty body says nothing."""
    if not body.strip():
        return StoreResponse()
    media = content_type.split(";", 1)[0].strip().lower()
    if media.endswith("xml"):
        return _parse_xml(body)
    if media.endswith("json"):
        return _parse_json(body)
    raise ResponseError(f"response body of media type {media or 'none'!r}, not DICOM JSON or XML")


def _parse_json(body: bytes) -> StoreResponse:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResponseError(f"response body is not JSON: {exc}") from None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # some servers answer with an array of one dataset
    if not isinstance(data, dict):
        raise ResponseError("response body is not a DICOM JSON dataset")
    return StoreResponse(
        referenced=_json_items(data, REFERENCED_SOP_SEQUENCE, WARNING_REASON),
        failed=_json_items(data, FAILED_SOP_SEQUENCE, FAILURE_REASON),
    )


def _json_items(data: Mapping[str, Any], sequence: str, reason: str) -> dict[str, int | None]:
    items = _json_values(data, sequence)
    found: dict[str, int | None] = {}
    for item in items:
        if not isinstance(item, dict):
            raise ResponseError(f"({sequence[:4]},{sequence[4:]}) holds an item that is no dataset")
        uids = _json_values(item, REFERENCED_SOP_INSTANCE_UID)
        if uids and isinstance(uids[0], str):
            found[uids[0].strip()] = _reason(_json_values(item, reason))
    return found


def _json_values(data: Mapping[str, Any], tag: str) -> list[Any]:
    element = data.get(tag) or data.get(tag.lower()) or {}
    values = element.get("Value", []) if isinstance(element, dict) else []
    return values if isinstance(values, list) else []


def _reason(values: Sequence[Any]) -> int | None:
    if not values:
        return None
    value = values[0]
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        return None


def _parse_xml(body: bytes) -> StoreResponse:
    try:
        # Python's expat refuses entity expansion attacks (billion laughs) by itself.
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise ResponseError(f"response body is not XML: {exc}") from None
    return StoreResponse(
        referenced=_xml_items(root, REFERENCED_SOP_SEQUENCE, WARNING_REASON),
        failed=_xml_items(root, FAILED_SOP_SEQUENCE, FAILURE_REASON),
    )


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]  # without the Native DICOM Model namespace


def _xml_attribute(parent: ElementTree.Element, tag: str) -> ElementTree.Element | None:
    for child in parent:
        if _local(child.tag) == "DicomAttribute" and child.get("tag", "").upper() == tag:
            return child
    return None


def _xml_values(parent: ElementTree.Element, tag: str) -> list[str]:
    attribute = _xml_attribute(parent, tag)
    if attribute is None:
        return []
    return [(v.text or "").strip() for v in attribute if _local(v.tag) == "Value" and v.text]


def _xml_items(root: ElementTree.Element, sequence: str, reason: str) -> dict[str, int | None]:
    attribute = _xml_attribute(root, sequence)
    found: dict[str, int | None] = {}
    for item in attribute if attribute is not None else ():
        if _local(item.tag) != "Item":
            continue
        uids = _xml_values(item, REFERENCED_SOP_INSTANCE_UID)
        if uids:
            found[uids[0]] = _reason(_xml_values(item, reason))
    return found


def describe_reason(code: int) -> str:
    name = REASON_NAMES.get(code) or REASON_NAMES.get(code & 0xFF00, "")
    if not name and 0xC000 <= code <= 0xCFFF:
        name = "cannot understand"
    return f"0x{code:04X}" + (f" ({name})" if name else "")


def describe_status(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


@dataclass(frozen=True)
class InstanceOutcome:
    """What the answer came to for one SOP Instance UID of the request."""

    verdict: Verdict
    detail: str
    warning: bool = False  # stored, with a Warning Reason (or as a duplicate)
    busy: bool = False  # out of resources there (0xA7xx): hold the destination


@dataclass(frozen=True)
class Answer:
    """A STOW-RS response read: a hold for the whole destination, or one outcome per UID."""

    hold: str | None
    outcomes: Mapping[str, InstanceOutcome] = field(default_factory=dict)


def read_answer(
    status: int, content_type: str, body: bytes, sent: Sequence[str], where: str
) -> Answer:
    """The response to a request that carried the SOP Instance UIDs `sent`, from `where`."""
    said = f"{describe_status(status)} from {where}"
    if status in HOLD_STATUSES or status >= 500:
        return Answer(hold=said)
    if status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE:
        return Answer(None, {uid: InstanceOutcome(Verdict.NEXT_SYNTAX, said) for uid in sent})
    try:
        response = parse_response(content_type, body)
        unreadable = ""
    except ResponseError as exc:
        response, unreadable = StoreResponse(), f" ({exc})"
    return Answer(
        None,
        {uid: _instance_outcome(uid, status, response, said + unreadable, sent) for uid in sent},
    )


def _instance_outcome(
    uid: str, status: int, response: StoreResponse, said: str, sent: Sequence[str]
) -> InstanceOutcome:
    if uid in response.failed:
        return _failure_outcome(response.failed[uid], said)
    if uid in response.referenced:
        reason = response.referenced[uid]
        if reason:
            return InstanceOutcome(
                Verdict.DELIVERED, f"{said}, warning {describe_reason(reason)}", warning=True
            )
        return InstanceOutcome(Verdict.DELIVERED, said)
    if 200 <= status < 300 and status != HTTPStatus.ACCEPTED:
        return InstanceOutcome(Verdict.DELIVERED, said)  # 200: all stored, listed or not
    if status in (HTTPStatus.ACCEPTED, HTTPStatus.CONFLICT):
        return InstanceOutcome(Verdict.RETRY, f"{said}, which does not list this instance")
    if len(sent) > 1:
        return InstanceOutcome(Verdict.ALONE, said)
    return InstanceOutcome(Verdict.REFUSED, said)


def _failure_outcome(reason: int | None, said: str) -> InstanceOutcome:
    if reason is None:
        return InstanceOutcome(Verdict.RETRY, f"{said}: failed, without a Failure Reason")
    detail = f"{said}: failed, {describe_reason(reason)}"
    if reason == SYNTAX_NOT_SUPPORTED:
        return InstanceOutcome(Verdict.NEXT_SYNTAX, detail)
    if reason == DUPLICATE_SOP_INSTANCE:
        # It holds this SOP Instance UID: a resend after a crash (at least once) lands here.
        return InstanceOutcome(Verdict.DELIVERED, detail, warning=True)
    if code_to_category(reason) in (STATUS_SUCCESS, STATUS_WARNING):
        return InstanceOutcome(Verdict.DELIVERED, detail, warning=True)
    if 0xA700 <= reason <= 0xA7FF:
        return InstanceOutcome(Verdict.RETRY, detail, busy=True)
    if reason == PROCESSING_FAILURE:
        return InstanceOutcome(Verdict.RETRY, detail)
    return InstanceOutcome(Verdict.REFUSED, detail)  # 0x0122, 0x0124, 0xA9xx, 0xCxxx, unknown
