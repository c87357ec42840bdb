"""Command-line SCU: C-ECHO and C-STORE to any DICOM node, for first tests and for moving files."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time
from tqdm import tqdm

from node.net.requestor import prepare_requestor

log = logging.getLogger("node.scu")

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse 'AE@host:port'."""
        found = _PEER.match(text)
        if not found:
            raise ValueError(f"expected AE@host:port (for example PACS@10.0.0.5:104), got {text!r}")
        return cls(found["ae"], found["host"].strip("[]"), int(found["port"]))


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
    """Send one C-ECHO; return the status, or -1 if no association could be made."""
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        return -1
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else -1
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


def _batches(files: list[OutgoingFile]) -> Iterator[list[OutgoingFile]]:
    """Split files so each association needs at most MAX_CONTEXTS presentation contexts."""
    batch: list[OutgoingFile] = []
    contexts: set[tuple[str, str]] = set()
    for item in files:
        needed = {(item.sop_class_uid, item.transfer_syntax), (item.sop_class_uid, "native")}
        if len(contexts | needed) > MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        batch.append(item)
        contexts |= needed
    if batch:
        yield batch


def _associate(
    peer: Peer, calling_ae_title: str, batch: list[OutgoingFile], timeout: float
) -> Association:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.maximum_pdu_size = 0
    syntaxes: dict[str, set[str]] = {}
    for item in batch:
        syntaxes.setdefault(item.sop_class_uid, set()).add(item.transfer_syntax)
    for sop_class, found in syntaxes.items():
        # One context per syntax so the peer can accept each file as it is.
        for syntax in sorted(found):
            ae.add_requested_context(sop_class, [syntax])
        native = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        if not found <= set(native):
            ae.add_requested_context(sop_class, native)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if assoc.is_established:
        prepare_requestor(assoc)
    return assoc


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
    assoc = _associate(peer, calling_ae_title, batch, timeout)
    if not assoc.is_established:
        for item in batch:
            summary.fail("association rejected or peer unreachable", item.path)
        bar.update(len(batch))
        return
    try:
        for item in batch:
            _send_one(assoc, item, summary)
            bar.update(1)
    finally:
        if assoc.is_established:
            assoc.release()


def _own_syntax_accepted(assoc: Association, item: OutgoingFile) -> bool:
    return any(
        cx.abstract_syntax == item.sop_class_uid and cx.transfer_syntax[0] == item.transfer_syntax
        for cx in assoc.accepted_contexts
    )


@contextmanager
def _bytes_as_on_disk(enabled: bool) -> Iterator[None]:
    """Send the file's dataset bytes untouched when the peer takes the file's own syntax.

    Otherwise pynetdicom decodes the file with pydicom and re-encodes it, which
    drops group lengths and trailing padding, and sends a truncated file as if
    it were whole; the receiver could not tell. Re-encoding is only needed to
    convert between uncompressed syntaxes when the peer refused the file's own.
    """
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = enabled
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def _send_one(assoc: Association, item: OutgoingFile, summary: SendSummary) -> None:
    if not assoc.is_established:
        summary.fail("association lost", item.path)
        return
    try:
        with _bytes_as_on_disk(_own_syntax_accepted(assoc, item)):
            status = assoc.send_c_store(item.path)
    except Exception as exc:
        summary.fail(f"could not send: {exc}", item.path)
        return
    code = int(status.Status) if "Status" in status else -1
    if code == 0x0000:
        summary.sent += 1
    elif code in (0xB000, 0xB006, 0xB007):
        summary.sent += 1
        summary.warnings += 1
    elif code == -1:
        summary.fail("no response (timeout or aborted association)", item.path)
    else:
        summary.fail(f"status 0x{code:04X}", item.path)


def format_summary(summary: SendSummary) -> str:
    lines = [f"sent: {summary.sent} (warnings: {summary.warnings}), failed: {summary.failed_count}"]
    for reason, count in Counter({r: len(p) for r, p in summary.failed.items()}).most_common():
        example = summary.failed[reason][0]
        lines.append(f"  {count} x {reason} (e.g. {example})")
    return "\n".join(lines)
