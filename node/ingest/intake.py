"""Intake: turn one C-STORE request into a durable, queued instance and a DICOM status.

Order matters and is the node's central promise: check the dataset, write it
to the spool with fsync, record the instance and its jobs in one transaction,
and only then return Success. Any failure on the way returns a failure status
(the sender keeps the image and retries) and leaves nothing half-written.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.dicom.header import DatasetError, check_structure, decode_received, read_header
from node.dicom.syntaxes import syntax_name
from node.ingest.spool import Spool, part10_header
from node.jobs.interface import JobQueue
from node.jobs.model import JobSpec, ReceivedInstance
from node.store.durable import FileRegion

log = logging.getLogger("node.intake")


class Status(IntEnum):
    """C-STORE statuses the node returns (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    DUPLICATE_SOP_INSTANCE = 0x0111
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC210


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE as the SCP received it: identifiers from the message, dataset as encoded."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    calling_ae_title: str
    called_ae_title: str
    dataset: bytes | memoryview
    # The same bytes on disk, when the SCP spilled them to a file (node.receiving):
    # spooled by a kernel copy, so a multi-GB instance never passes through memory.
    dataset_file: FileRegion | None = None


@dataclass(frozen=True)
class IntakeResult:
    status: Status
    reason: str = ""
    instance_id: int | None = None


# Chooses the jobs for an instance from its header and the association's AE titles.
JobPlanner = Callable[[Dataset, StoreRequest], Sequence[JobSpec]]
# Says which storage targets refuse duplicates.
DuplicateCheck = Callable[[str, Sequence[JobSpec]], str | None]
# The header values the storage layouts need, recorded with the instance (node.store.targets).
HeaderValues = Callable[[Dataset], tuple[tuple[str, str], ...]]


class Intake:
    def __init__(
        self,
        spool: Spool,
        queue: JobQueue,
        plan_jobs: JobPlanner,
        find_duplicate: DuplicateCheck,
        has_headroom: Callable[[], bool],
        max_instance_size: int = 0,
        on_recorded: Callable[[], None] = lambda: None,
        header_values: HeaderValues = lambda header: (),
    ) -> None:
        self.spool = spool
        self.queue = queue
        self.plan_jobs = plan_jobs
        self.find_duplicate = find_duplicate
        self.has_headroom = has_headroom
        self.max_instance_size = max_instance_size
        self.on_recorded = on_recorded
        self.header_values = header_values

    def receive(self, request: StoreRequest) -> IntakeResult:
        """Run the whole intake for one instance and say which status to answer."""
        refusal = self._refuse_early(request)
        if refusal:
            return refusal
        # DatasetError is the header parser's only way to fail (node.header): raised
        # while the bytes are walked and parsed, or while the identity check or the
        # routing rules first read a value. Hostile bytes get 0xC210 and the
        # association goes on; any other exception is our bug and aborts it.
        try:
            header = self._read_checked_header(request)
            mismatch = _identity_mismatch(header, request)
            if mismatch:
                return IntakeResult(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, mismatch)
            jobs = self.plan_jobs(header, request)
        except DatasetError as exc:
            return IntakeResult(Status.CANNOT_UNDERSTAND, str(exc))
        duplicate_in = self.find_duplicate(request.sop_instance_uid, jobs)
        if duplicate_in:
            return IntakeResult(
                Status.DUPLICATE_SOP_INSTANCE,
                f"already stored in {duplicate_in!r}, whose duplicates policy is 'reject'",
            )
        return self._spool_and_record(request, jobs, self.header_values(header))

    def _refuse_early(self, request: StoreRequest) -> IntakeResult | None:
        unusable = _unusable_identifiers(request)
        if unusable:
            return IntakeResult(Status.CANNOT_UNDERSTAND, unusable)
        size = len(request.dataset)
        if self.max_instance_size and size > self.max_instance_size:
            return IntakeResult(
                Status.OUT_OF_RESOURCES,
                f"instance is {size} bytes, over limits.max_instance_size={self.max_instance_size}",
            )
        if not self.has_headroom():
            return IntakeResult(
                Status.OUT_OF_RESOURCES,
                "free disk space is below limits.min_free_space: free space or raise the limit",
            )
        return None

    def _read_checked_header(self, request: StoreRequest) -> Dataset:
        data, syntax = decode_received(
            request.dataset, request.transfer_syntax, self.max_instance_size
        )
        check_structure(data, syntax)
        return read_header(data, syntax)

    def _spool_and_record(
        self,
        request: StoreRequest,
        jobs: Sequence[JobSpec],
        header_values: tuple[tuple[str, str], ...] = (),
    ) -> IntakeResult:
        header = part10_header(
            request.sop_class_uid,
            request.sop_instance_uid,
            request.transfer_syntax,
            request.calling_ae_title,
        )
        try:
            spooled = self.spool.write(header, request.dataset_file or request.dataset)
        except OSError as exc:
            return IntakeResult(
                Status.OUT_OF_RESOURCES, f"cannot write to the spool: {_describe(exc)}"
            )
        instance = ReceivedInstance(
            sop_instance_uid=request.sop_instance_uid,
            sop_class_uid=request.sop_class_uid,
            transfer_syntax=request.transfer_syntax,
            calling_ae_title=request.calling_ae_title,
            called_ae_title=request.called_ae_title,
            spool_path=spooled.path,
            size=spooled.size,
            header_values=header_values,
        )
        try:
            instance_id = self.queue.record_instance(instance, jobs)
        except Exception as exc:  # sqlite3.Error or OSError: either way nothing was recorded
            self.spool.remove(spooled.path)
            return IntakeResult(Status.OUT_OF_RESOURCES, f"cannot record in the queue: {exc}")
        self.on_recorded()
        return IntakeResult(Status.SUCCESS, instance_id=instance_id)


def _identity_mismatch(header: Dataset, request: StoreRequest) -> str | None:
    """The dataset must be the instance the C-STORE message says it is."""
    in_dataset = {
        "SOPInstanceUID": header.get("SOPInstanceUID"),
        "SOPClassUID": header.get("SOPClassUID"),
    }
    in_message = {
        "SOPInstanceUID": request.sop_instance_uid,
        "SOPClassUID": request.sop_class_uid,
    }
    for keyword, expected in in_message.items():
        found = in_dataset[keyword]
        if found is None:
            # Type 1 in the SOP Common Module (PS3.3 C.12.1). Without it the storage
            # layout would name the file UNKNOWN, where the next such instance lands too.
            return f"the dataset has no {keyword}, which the SOP Common Module requires"
        if str(found) != expected:
            # repr: the value is the sender's bytes, and goes into the log as it is.
            return (
                f"{keyword} in the dataset is {str(found)!r},"
                f" but the C-STORE request says {expected}"
            )
    return None


def _unusable_identifiers(request: StoreRequest) -> str | None:
    """The C-STORE request's UIDs go into the spooled file's meta and the queue: they must
    be there, and be ASCII text (PS3.5 9.1), not the sender's bytes decoded with
    replacement characters."""
    for name, uid in (
        ("Affected SOP Class UID", request.sop_class_uid),
        ("Affected SOP Instance UID", request.sop_instance_uid),
    ):
        if not uid:
            return f"the C-STORE request has no {name}"
        if not (uid.isascii() and uid.isprintable()):
            return f"the C-STORE request's {name} {uid!r} is not a UID"
    return None


def _describe(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (free space on the spool's filesystem)"
    return os.strerror(exc.errno) if exc.errno else str(exc)


def describe_request(request: StoreRequest) -> str:
    uid = request.sop_instance_uid
    shown = uid if uid.isascii() and uid.isprintable() else repr(uid)
    return (
        f"SOP Instance UID {shown or '(none)'} from {request.calling_ae_title!r}"
        f" in {syntax_name(request.transfer_syntax)}"
    )


def free_space_probe(folders: Sequence[Path], minimum: int) -> Callable[[], bool]:
    """A cheap check that every folder's filesystem keeps `minimum` bytes free."""

    def has_headroom() -> bool:
        if minimum <= 0:
            return True
        for folder in folders:
            stats = os.statvfs(folder)
            if stats.f_bavail * stats.f_frsize < minimum:
                return False
        return True

    return has_headroom
