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

from node.shape import ShapeContext, Shaping, ShapingFailed, ShapingRefused
from node.transcode.files import copy_atomically
from node.transcode.rung import RungResult, try_rung
from node.transcode.targets import Target

log = logging.getLogger("node.transcode")

Attempt = Callable[[Target | None], RungResult]


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
    src: Path,
    dst: Path,
    ladder: Sequence[Target],
    *,
    allow_lossy: bool = False,
    shaping: Shaping | None = None,
    context: ShapeContext | None = None,
) -> Outcome:
    """Transcode in this process (codec crashes take the process down: see TranscodePool)."""
    src, dst = Path(src), Path(dst)
    shape_context = context or ShapeContext()

    def attempt(target: Target | None) -> RungResult:
        return try_rung(src, dst, target, allow_lossy, shaping, shape_context)

    return walk_ladder(src, dst, ladder, attempt, shaped=shaping is not None)


def walk_ladder(
    src: Path, dst: Path, ladder: Sequence[Target], attempt: Attempt, *, shaped: bool = False
) -> Outcome:
    """The first rung that verifies; else the instance as received. A shaped target never
    gets it as received: its last rung is the header-only one (attempt(None)), and when
    that fails too, or the shaping refuses the instance, ShapingFailed says why."""
    source_size = src.stat().st_size
    reasons: list[str] = []
    for position, target in enumerate([*ladder, None] if shaped else ladder):
        if target is None and position > 0:
            log.info("%s: header only, in the syntax as received (%s)", "; ".join(reasons), src)
        result = attempt(target)
        if result.unshapable:
            raise (ShapingRefused if result.unshapable == "refused" else ShapingFailed)(
                result.reason
            )
        if result.ok:
            return Outcome(
                UID(result.transfer_syntax) if target is None else target.transfer_syntax,
                result.sop_instance_uid,
                fallback=position > 0,
                reasons=tuple(reasons),
                size=result.size,
                source_size=source_size,
            )
        reasons.append(f"{target.name if target else 'header only'}: {result.reason}")
        _log_failed_rung(src, result)
    if shaped:
        raise ShapingFailed("; ".join(reasons))
    return _as_received(src, dst, tuple(reasons), fallback=bool(ladder), source_size=source_size)


def _log_failed_rung(src: Path, result: RungResult) -> None:
    name = result.target.name if result.target else "header only"
    if result.mismatch:
        verification_mismatches.increment()
        log.error(
            "%s: %s (SOP Instance UID %s, %s); not written",
            name,
            result.reason,
            result.source_sop_instance_uid,
            src,
        )
    else:
        log.info("%s: %s (%s)", name, result.reason, src)


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
