"""Command-line SCU: C-ECHO and C-STORE to any DICOM node, for first tests and for moving files.

Both speak through the node's own requestor (node.net.storelink), the one the
forwarder uses, so `send` streams each file's dataset bytes as they are on disk.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from tqdm import tqdm

from node.net.dimse import VERIFICATION
from node.net.pdu import MAX_PRESENTATION_CONTEXTS
from node.net.storelink import LinkError, Peer, Response, StoreAssociation, Timeouts, associate

log = logging.getLogger("node.scu")

NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
ECHO_MAX_PDU = 16382  # what pynetdicom, the SCU before ours, advertised
SEND_MAX_PDU = 0  # responses only: no limit


@dataclass(frozen=True)
class OutgoingFile:
    path: Path
    sop_class_uid: str
    transfer_syntax: str


@dataclass
class SendSummary:
    sent: int = 0
    warnings: int = 0
    failed: dict[str, list[Path]] = field(default_factory=dict)

    def fail(self, reason: str, path: Path) -> None:
        self.failed.setdefault(reason, []).append(path)

    @property
    def failed_count(self) -> int:
        return sum(len(paths) for paths in self.failed.values())


def echo(peer: Peer, calling_ae_title: str, timeout: float = 30.0) -> int:
    """Send one C-ECHO; return the status, or -1 if no association could be made or it broke."""
    contexts = [(VERIFICATION, ImplicitVRLittleEndian), (VERIFICATION, ExplicitVRLittleEndian)]
    try:
        assoc = associate(
            peer,
            calling_ae_title,
            contexts,
            max_pdu=ECHO_MAX_PDU,
            timeouts=Timeouts(timeout, timeout, timeout),
        )
    except LinkError as exc:
        log.info("C-ECHO to %s: %s", peer, exc)
        return -1
    try:
        return assoc.echo(VERIFICATION).status
    except (LinkError, ValueError) as exc:
        log.info("C-ECHO to %s: %s", peer, exc)
        return -1
    finally:
        assoc.release()


def find_files(inputs: Iterable[Path]) -> Iterator[Path]:
    for item in inputs:
        if item.is_dir():
            yield from sorted(p for p in item.rglob("*") if p.is_file())
        else:
            yield item


def describe_file(path: Path) -> OutgoingFile:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if "SOPClassUID" not in ds or syntax is None:
        raise InvalidDicomError("no SOP Class UID or transfer syntax")
    return OutgoingFile(path, str(ds.SOPClassUID), str(syntax))


def _contexts(item: OutgoingFile) -> set[tuple[str, str]]:
    """The file's own syntax, and the uncompressed ones it can be re-encoded into."""
    needed = {(item.sop_class_uid, item.transfer_syntax)}
    if not UID(item.transfer_syntax).is_compressed:
        needed |= {(item.sop_class_uid, syntax) for syntax in NATIVE_SYNTAXES}
    return needed


def _batches(files: list[OutgoingFile]) -> Iterator[list[OutgoingFile]]:
    """Split files so each association needs at most MAX_PRESENTATION_CONTEXTS contexts."""
    batch: list[OutgoingFile] = []
    contexts: set[tuple[str, str]] = set()
    for item in files:
        needed = _contexts(item)
        if len(contexts | needed) > MAX_PRESENTATION_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        batch.append(item)
        contexts |= needed
    if batch:
        yield batch


def _associate(
    peer: Peer, calling_ae_title: str, batch: list[OutgoingFile], timeout: float
) -> StoreAssociation:
    """One context per (SOP class, syntax), so the peer can accept each file as it is."""
    contexts = sorted(set().union(*(_contexts(item) for item in batch)))
    return associate(
        peer,
        calling_ae_title,
        contexts,
        max_pdu=SEND_MAX_PDU,
        timeouts=Timeouts(timeout, timeout, timeout),
    )


def send(
    peer: Peer,
    inputs: Iterable[Path],
    calling_ae_title: str,
    timeout: float = 60.0,
    progress: bool = True,
) -> SendSummary:
    """C-STORE every DICOM file found under inputs; report what succeeded and why others failed."""
    summary = SendSummary()
    outgoing: list[OutgoingFile] = []
    for path in find_files(inputs):
        try:
            outgoing.append(describe_file(path))
        except Exception as exc:
            summary.fail(f"not a readable DICOM file ({type(exc).__name__})", path)
    bar = tqdm(
        total=len(outgoing), unit="file", disable=not progress, desc=f"sending to {peer.ae_title}"
    )
    for batch in _batches(outgoing):
        _send_batch(peer, calling_ae_title, batch, timeout, summary, bar)
    bar.close()
    return summary


def _send_batch(
    peer: Peer,
    calling_ae_title: str,
    batch: list[OutgoingFile],
    timeout: float,
    summary: SendSummary,
    bar: tqdm,
) -> None:
    try:
        assoc = _associate(peer, calling_ae_title, batch, timeout)
    except LinkError as exc:
        log.info("no association with %s: %s", peer, exc)
        for item in batch:
            summary.fail("association rejected or peer unreachable", item.path)
        bar.update(len(batch))
        return
    try:
        for item in batch:
            _send_one(assoc, item, summary)
            bar.update(1)
    finally:
        assoc.release()


def _store(assoc: StoreAssociation, item: OutgoingFile) -> Response:
    """The file's dataset bytes untouched when the peer takes the file's own syntax.

    Re-encoding (with pydicom, as pynetdicom did) drops group lengths and trailing
    padding, and would send a truncated file as if it were whole; the receiver
    could not tell. So it is done only to convert between uncompressed syntaxes
    when the peer refused the file's own.
    """
    accepted = assoc.accepted(item.sop_class_uid)
    if item.transfer_syntax in accepted or UID(item.transfer_syntax).is_compressed:
        return assoc.store(item.path)  # refused syntaxes raise ValueError, naming them
    target = next((UID(s) for s in NATIVE_SYNTAXES if s in accepted), None)
    if target is None:
        return assoc.store(item.path)
    ds = pydicom.dcmread(item.path)
    dataset = encode(ds, target.is_implicit_VR, target.is_little_endian)
    if dataset is None:
        raise ValueError(f"cannot encode the dataset in {target.name}")
    return assoc.store_encoded(str(ds.SOPClassUID), str(ds.SOPInstanceUID), target, dataset)


def _send_one(assoc: StoreAssociation, item: OutgoingFile, summary: SendSummary) -> None:
    if not assoc.established:
        summary.fail("association lost", item.path)
        return
    try:
        code = _store(assoc, item).status
    except LinkError as exc:
        log.info("C-STORE of %s: %s", item.path, exc)
        summary.fail("no response (timeout or aborted association)", item.path)
        return
    except Exception as exc:
        summary.fail(f"could not send: {exc}", item.path)
        return
    category = code_to_category(code)
    if category == STATUS_SUCCESS:
        summary.sent += 1
    elif category == STATUS_WARNING:
        summary.sent += 1
        summary.warnings += 1
    else:
        summary.fail(f"status 0x{code:04X}", item.path)


def format_summary(summary: SendSummary) -> str:
    lines = [f"sent: {summary.sent} (warnings: {summary.warnings}), failed: {summary.failed_count}"]
    for reason, count in Counter({r: len(p) for r, p in summary.failed.items()}).most_common():
        example = summary.failed[reason][0]
        lines.append(f"  {count} x {reason} (e.g. {example})")
    return "\n".join(lines)
