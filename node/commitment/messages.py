"""The Storage Commitment Push Model's data sets (PS3.4 J.3), encoded and decoded sans I/O.

The command sets are node.net.dimse's; these are the data sets that follow them:
the N-ACTION-RQ's Action Information (Transaction UID and Referenced SOP
Sequence) and the N-EVENT-REPORT-RQ's Event Information (the same, split into
the committed instances and the Failed SOP Sequence with a Failure Reason
each). They are a few elements per instance, in Implicit or Explicit VR Little
Endian as the presentation context says, so pydicom writes and reads them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, cast

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
# The well-known SOP Instance of the Push Model (PS3.4 J.3.2): every N-ACTION names it.
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID (PS3.4 J.3.2.1.1)
ALL_COMMITTED = 1  # Event Type ID: Storage Commitment Request Successful (J.3.3.1)
FAILURES_EXIST = 2  # Event Type ID: Storage Commitment Request Complete - Failures Exist
COMMITMENT_SYNTAXES = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))

# Failure Reason (0008,1197), PS3.3 C.14.1.1
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
RESOURCE_LIMITATION = 0x0213
REFERENCED_SOP_CLASS_NOT_SUPPORTED = 0x0122
CLASS_INSTANCE_CONFLICT = 0x0119
DUPLICATE_TRANSACTION_UID = 0x0131
FAILURE_REASONS = {
    PROCESSING_FAILURE: "processing failure",
    NO_SUCH_OBJECT_INSTANCE: "no such object instance",
    RESOURCE_LIMITATION: "resource limitation",
    REFERENCED_SOP_CLASS_NOT_SUPPORTED: "referenced SOP Class not supported",
    CLASS_INSTANCE_CONFLICT: "class/instance conflict",
    DUPLICATE_TRANSACTION_UID: "duplicate transaction UID",
}
# Statuses of an N-ACTION-RSP the node sends (PS3.7 10.1.4.1.10, annex C).
MISSING_ATTRIBUTE = 0x0120
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_ACTION_TYPE = 0x0123


class CommitmentMessageError(Exception):
    """A Storage Commitment data set that cannot be read or lacks what PS3.4 J requires."""


@dataclass(frozen=True)
class Reference:
    """One Referenced SOP Sequence item: the SOP Class and SOP Instance UIDs."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Failure:
    reference: Reference
    reason: int


@dataclass(frozen=True)
class CommitmentRequest:
    """An N-ACTION-RQ's Action Information."""

    transaction_uid: str
    references: tuple[Reference, ...]


@dataclass(frozen=True)
class CommitmentReport:
    """An N-EVENT-REPORT-RQ's Event Information."""

    transaction_uid: str
    committed: tuple[Reference, ...]
    failed: tuple[Failure, ...]

    @property
    def event_type_id(self) -> int:
        return FAILURES_EXIST if self.failed else ALL_COMMITTED


def new_transaction_uid() -> str:
    """A Transaction UID under the 2.25 root (a UUID as a number, PS3.5 B.2)."""
    return f"2.25.{uuid.uuid4().int}"


def describe_reason(reason: int) -> str:
    return f"0x{reason:04X} ({FAILURE_REASONS.get(reason, 'failure')})"


def encode_request(request: CommitmentRequest, transfer_syntax: str) -> bytes:
    ds = Dataset()
    ds.TransactionUID = request.transaction_uid
    ds.ReferencedSOPSequence = [_item(ref) for ref in request.references]
    return _encode(ds, transfer_syntax)


def decode_request(data: bytes | memoryview, transfer_syntax: str) -> CommitmentRequest:
    ds = _decode(data, transfer_syntax)
    transaction_uid = _transaction_uid(ds)
    references = _references(ds, "ReferencedSOPSequence")
    if not references:
        raise CommitmentMessageError("the Referenced SOP Sequence (0008,1199) is missing or empty")
    return CommitmentRequest(transaction_uid, references)


def encode_report(report: CommitmentReport, transfer_syntax: str) -> bytes:
    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    if report.committed:
        ds.ReferencedSOPSequence = [_item(ref) for ref in report.committed]
    if report.failed:
        ds.FailedSOPSequence = [_item(f.reference, f.reason) for f in report.failed]
    return _encode(ds, transfer_syntax)


def decode_report(data: bytes | memoryview, transfer_syntax: str) -> CommitmentReport:
    ds = _decode(data, transfer_syntax)
    failed = []
    for index, item in enumerate(ds.get("FailedSOPSequence") or ()):
        reference = _reference(item, "FailedSOPSequence", index)
        reason = item.get("FailureReason")
        failed.append(Failure(reference, int(reason) if reason is not None else PROCESSING_FAILURE))
    return CommitmentReport(
        _transaction_uid(ds), _references(ds, "ReferencedSOPSequence"), tuple(failed)
    )


def _item(reference: Reference, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = reference.sop_class_uid
    item.ReferencedSOPInstanceUID = reference.sop_instance_uid
    if reason is not None:
        item.FailureReason = reason
    return item


def _encode(ds: Dataset, transfer_syntax: str) -> bytes:
    stream = DicomBytesIO()
    stream.is_little_endian = True
    stream.is_implicit_VR = transfer_syntax == str(ImplicitVRLittleEndian)
    write_dataset(stream, ds)
    return bytes(stream.getvalue())


def _decode(data: bytes | memoryview, transfer_syntax: str) -> Dataset:
    if transfer_syntax not in COMMITMENT_SYNTAXES:
        raise CommitmentMessageError(f"transfer syntax {transfer_syntax} is not negotiated here")
    try:
        ds = read_dataset(
            cast(BinaryIO, DicomBytesIO(bytes(data))),
            transfer_syntax == str(ImplicitVRLittleEndian),
            True,
        )
        ds.decode()  # every value now, so that a bad one fails here and not later
        return ds
    except Exception as exc:  # pydicom raises what its parsers meet on hostile bytes
        raise CommitmentMessageError(f"the data set cannot be read: {exc}") from None


def _transaction_uid(ds: Dataset) -> str:
    value = str(ds.get("TransactionUID") or "").strip()
    if not value or len(value) > 64:
        raise CommitmentMessageError("the Transaction UID (0008,1195) is missing or invalid")
    return value


def _references(ds: Dataset, keyword: str) -> tuple[Reference, ...]:
    items: Sequence[Dataset] = ds.get(keyword) or ()
    return tuple(_reference(item, keyword, index) for index, item in enumerate(items))


def _reference(item: Dataset, keyword: str, index: int) -> Reference:
    sop_class = str(item.get("ReferencedSOPClassUID") or "").strip()
    sop_instance = str(item.get("ReferencedSOPInstanceUID") or "").strip()
    if not sop_class or not sop_instance:
        raise CommitmentMessageError(
            f"{keyword} item {index + 1} lacks its Referenced SOP Class or Instance UID"
        )
    return Reference(sop_class, sop_instance)
