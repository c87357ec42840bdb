"""Derived files: a spooled instance re-encoded in another transfer syntax, made once and shared.

Several destinations may want the same instance in the same syntax; the first one
to ask pays for the transcode, the others reuse the file. A compressed instance is
decoded at most once: its Explicit VR Little Endian copy is made first and every
other syntax is encoded from that copy. Derived files live in `spool/derived/`
and are deleted together with their spool file (see Spool.remove).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import UID, ExplicitVRLittleEndian

from node.daemon import metrics
from node.dicom.syntaxes import NATIVE, resolve_syntax, syntax_name
from node.shape import ShapeContext, Shaping, ShapingFailed
from node.transcode import Outcome, Target, parse_target

log = logging.getLogger("node.derived")

DERIVED_FOLDER = "derived"

# (source, destination, ladder, allow_lossy) -> Outcome; TranscodePool.transcode fits.
LadderTranscode = Callable[..., Outcome]


class Untranscodable(Exception):
    """The engine could not produce the instance in the wanted syntax (the reason says why)."""


class Unshapable(Untranscodable):
    """The destination's view of the instance cannot be made in any syntax (refused for
    de-identification, a coerced value too long): the reason is final."""


def derived_folder(spool_dir: Path) -> Path:
    return spool_dir / DERIVED_FOLDER


def _rung_for(target: str | Target, source_syntax: str) -> Target | None:
    """The ladder rung for a wanted syntax, None when that is the source's syntax.
    Untranscodable for a syntax we never write, such as the retired Explicit VR Big
    Endian: the instance then goes in the next syntax the peer accepted."""
    try:
        return parse_target(target)
    except ValueError as error:
        if isinstance(target, str) and _names_syntax(target, source_syntax):
            return None  # e.g. big endian to a big endian peer: as received
        raise Untranscodable(str(error)) from None


def _names_syntax(name: str, syntax: str) -> bool:
    try:
        return resolve_syntax(name) == UID(syntax)
    except ValueError:
        return False


class DerivedFiles:
    """Per (spooled instance, transfer syntax) cache of verified transcodes."""

    def __init__(self, spool_dir: Path, transcode: LadderTranscode, stripes: int = 64) -> None:
        self.folder = derived_folder(spool_dir)
        self.transcode = transcode
        # Striped locks: two destinations asking for the same file wait for one transcode.
        self._locks = [threading.Lock() for _ in range(stripes)]
        self._failures: dict[tuple[str, str], str] = {}
        self._failures_lock = threading.Lock()

    def prepare(self) -> None:
        """Create the folder; drop derived files whose spool file is gone (a crash between
        deleting the spool file and its derived files) and half-written temporaries."""
        self.folder.mkdir(parents=True, exist_ok=True)
        spool_dir = self.folder.parent
        for path in self.folder.iterdir():
            source = spool_dir / f"{path.name.lstrip('.').split('.', 1)[0]}.dcm"
            if path.name.startswith(".") or not source.exists():
                path.unlink(missing_ok=True)

    def path_for(self, source: Path, syntax: str, shaping: Shaping | None = None) -> Path:
        if shaping is None:
            return self.folder / f"{source.stem}.{syntax}.dcm"
        # One file per view: destinations with the same shaping share it, others get theirs.
        return self.folder / f"{source.stem}.{shaping.key}.{syntax}.dcm"

    def get(
        self,
        source: Path,
        source_syntax: str,
        target: str | Target,
        *,
        allow_lossy: bool = False,
        shaping: Shaping | None = None,
        context: ShapeContext | None = None,
    ) -> Path:
        """The instance at `source` encoded in `target`'s syntax; raises Untranscodable.

        With a shaping, the file is that destination's view: its header changed, in the
        same step as any transcode; never the spool file itself."""
        if shaping is not None:
            return self._shaped(source, source_syntax, target, allow_lossy, shaping, context)
        if isinstance(target, str) and target == source_syntax:
            return source  # the common case, per forwarded instance: skip parsing the target
        rung = _rung_for(target, source_syntax)
        if rung is None:
            return source
        syntax = rung.transfer_syntax
        if syntax == UID(source_syntax):
            return source
        path = self.path_for(source, syntax)
        if path.exists():
            return path
        self._raise_if_failed_before(source.stem, syntax)
        # Decoded before taking this syntax's lock: a thread holds at most one stripe at a
        # time, so two stripes (or one stripe hashed twice) can never deadlock.
        origin = self._decoded_origin(source, source_syntax, syntax)
        with self._locks[hash(path) % len(self._locks)]:
            if path.exists():
                return path
            self._raise_if_failed_before(source.stem, syntax)
            started = time.monotonic()
            outcome = self.transcode(origin, path, [rung], allow_lossy=allow_lossy)
            metrics.record_transcode(
                syntax_name(syntax),
                time.monotonic() - started,
                fallback=outcome.transfer_syntax != syntax,
                reasons=outcome.reasons,
            )
            if outcome.transfer_syntax != syntax:
                # The ladder's last rung copied the file as received: not what was asked.
                path.unlink(missing_ok=True)
                reason = "; ".join(outcome.reasons) or "no reason given"
                self._remember_failure(source.stem, syntax, reason)
                raise Untranscodable(f"cannot transcode to {syntax_name(syntax)}: {reason}")
            return path

    def _shaped(
        self,
        source: Path,
        source_syntax: str,
        target: str | Target,
        allow_lossy: bool,
        shaping: Shaping,
        context: ShapeContext | None,
    ) -> Path:
        rung = _rung_for(target, source_syntax)
        syntax = UID(source_syntax) if rung is None else rung.transfer_syntax
        header_only = syntax == UID(source_syntax)
        path = self.path_for(source, syntax, shaping)
        if path.exists():
            return path
        failure_key = f"{source.stem}.{shaping.key}"  # this view's failures, not another's
        self._raise_if_failed_before(failure_key, syntax)
        # Pixels decoded at most once for all destinations (the shared unshaped copy);
        # a header-only view decodes nothing.
        origin = source if header_only else self._decoded_origin(source, source_syntax, syntax)
        with self._locks[hash(path) % len(self._locks)]:
            if path.exists():
                return path
            self._raise_if_failed_before(failure_key, syntax)
            ladder = [] if header_only or rung is None else [rung]
            try:
                outcome = self.transcode(
                    origin, path, ladder, allow_lossy=allow_lossy, shaping=shaping, context=context
                )
            except ShapingFailed as failure:
                path.unlink(missing_ok=True)
                self._remember_failure(failure_key, UID(""), str(failure))  # any syntax
                raise Unshapable(str(failure)) from None
            if outcome.transfer_syntax != syntax:
                # Only the header changed, in the origin's syntax: not what was asked.
                path.unlink(missing_ok=True)
                reason = "; ".join(outcome.reasons) or "no reason given"
                self._remember_failure(failure_key, syntax, reason)
                raise Untranscodable(f"cannot transcode to {syntax_name(syntax)}: {reason}")
            return path

    def _decoded_origin(self, source: Path, source_syntax: str, syntax: UID) -> Path:
        """Where to encode from: the source if it is native, else its one decoded copy."""
        if UID(source_syntax) in NATIVE or syntax == ExplicitVRLittleEndian:
            return source
        return self.get(source, source_syntax, ExplicitVRLittleEndian.keyword)

    def _raise_if_failed_before(self, key: str, syntax: UID) -> None:
        """key: the spool file's stem, or stem.view for a shaped view."""
        with self._failures_lock:
            reason = self._failures.get((key, syntax))
            refusal = self._failures.get((key, ""))
        if refusal is not None:
            raise Unshapable(refusal)
        if reason is not None:
            raise Untranscodable(f"cannot transcode to {syntax_name(syntax)}: {reason}")

    def _remember_failure(self, key: str, syntax: UID, reason: str) -> None:
        # A failed encode fails again for the next destination: skip the work, keep the reason.
        with self._failures_lock:
            if len(self._failures) > 10_000:
                self._failures.clear()
            self._failures[(key, syntax)] = reason
