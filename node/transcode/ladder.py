"""Walking a fallback ladder: the first rung that verifies wins; the last resort is the
instance exactly as received."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID

from node.transcode.files import copy_atomically
from node.transcode.rung import RungResult, try_rung
from node.transcode.targets import Target

log = logging.getLogger("node.transcode")

Attempt = Callable[[Target], RungResult]


@dataclass(frozen=True)
class Outcome:
    transfer_syntax: UID
    sop_instance_uid: str
    fallback: bool
    reasons: tuple[str, ...]
    size: int
    source_size: int


class _Counter:
    """Verification mismatches seen by this process (they are bugs, so they are counted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def increment(self) -> None:
        with self._lock:
            self.value += 1


verification_mismatches = _Counter()


def transcode_file(
    src: Path, dst: Path, ladder: Sequence[Target], *, allow_lossy: bool = False
) -> Outcome:
    """Transcode in this process (codec crashes take the process down: see TranscodePool)."""
    src, dst = Path(src), Path(dst)
    return walk_ladder(src, dst, ladder, lambda target: try_rung(src, dst, target, allow_lossy))


def walk_ladder(src: Path, dst: Path, ladder: Sequence[Target], attempt: Attempt) -> Outcome:
    source_size = src.stat().st_size
    reasons: list[str] = []
    for position, target in enumerate(ladder):
        result = attempt(target)
        if result.ok:
            return Outcome(
                target.transfer_syntax,
                result.sop_instance_uid,
                fallback=position > 0,
                reasons=tuple(reasons),
                size=result.size,
                source_size=source_size,
            )
        reasons.append(f"{target.name}: {result.reason}")
        _log_failed_rung(src, result)
    return _as_received(src, dst, tuple(reasons), fallback=bool(ladder), source_size=source_size)


def _log_failed_rung(src: Path, result: RungResult) -> None:
    if result.mismatch:
        verification_mismatches.increment()
        log.error(
            "%s: %s (SOP Instance UID %s, %s); not written",
            result.target.name,
            result.reason,
            result.source_sop_instance_uid,
            src,
        )
    else:
        log.info("%s: %s (%s)", result.target.name, result.reason, src)


def _as_received(
    src: Path, dst: Path, reasons: tuple[str, ...], *, fallback: bool, source_size: int
) -> Outcome:
    # A byte copy: no decode, no codec, so nothing here can corrupt or crash.
    copy_atomically(src, dst)
    syntax, sop_uid = _identity(src)
    return Outcome(syntax, sop_uid, fallback, reasons, size=source_size, source_size=source_size)


def _identity(src: Path) -> tuple[UID, str]:
    try:
        ds = dcmread(src, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return UID(ds.file_meta.get("TransferSyntaxUID", "")), str(ds.get("SOPInstanceUID", ""))
    except Exception:
        return UID(""), ""
