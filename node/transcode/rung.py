"""One rung of the ladder: read the source, encode it to one target, verify, write."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ImplicitVRLittleEndian

from node.shape import ShapeContext, Shaping, ShapingFailed, ShapingRefused, apply_shaping
from node.transcode.byteorder import ByteOrderError, convert_byte_order
from node.transcode.capabilities import first_problem
from node.transcode.codecs import Codec, codec_for
from node.transcode.encoders import j2k_colour_transform
from node.transcode.files import write_atomically
from node.transcode.metadata import (
    keep_lossy_history,
    mark_lossy,
    private_sequences_of_undefined_length,
    set_encapsulated_pixels,
    set_native_pixels,
    set_transfer_syntax,
)
from node.transcode.pixels import (
    DecodedPixels,
    PixelInfo,
    decode_pixels,
    native_pixel_bytes,
    pixel_keyword,
)
from node.transcode.targets import NATIVE_SYNTAXES, Target
from node.transcode.verify import RungFailed, VerificationMismatch, verify_lossless, verify_lossy

_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class RungResult:
    """What happened on one rung; picklable so worker processes can return it."""

    target: Target | None  # None: the header-only rung (a shaping, in the source's syntax)
    ok: bool
    reason: str = ""
    mismatch: bool = False
    source_sop_instance_uid: str = ""
    sop_instance_uid: str = ""
    size: int = 0
    # The target's shaping could not be applied: "refused" (on purpose, e.g. burned-in
    # annotation) or "failed" (e.g. a value too long). No other rung can do better.
    unshapable: str = ""
    transfer_syntax: str = ""  # what was written


NO_SHAPING_CONTEXT = ShapeContext()


def try_rung(
    src: Path,
    dst: Path,
    target: Target | None,
    allow_lossy: bool,
    shaping: Shaping | None = None,
    context: ShapeContext = NO_SHAPING_CONTEXT,
) -> RungResult:
    """Write dst in target's syntax, or say in one line why not. Raises only for I/O errors.

    With a shaping, the target's header changes are made on the data set this rung
    encodes: one read, one encode. Target None is the header-only rung: the shaped data
    set in the source's own syntax, its Pixel Data written as it was read, never decoded.
    """
    if target is not None and target.lossy and not allow_lossy:
        return RungResult(target, ok=False, reason="lossy target not allowed without opt-in")
    try:
        ds, truncation = read_source(src)
    except Exception as error:
        return RungResult(target, ok=False, reason=f"source unreadable: {_short(error)}")
    if truncation:
        # pydicom reads what is there; writing that would turn a damaged instance into a
        # well-formed one with a value cut short or its Pixel Data gone.
        return RungResult(target, ok=False, reason=f"source truncated: {truncation}")
    source_uid = str(ds.get("SOPInstanceUID", ""))
    source_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if shaping is not None:
        try:
            apply_shaping(ds, shaping, context)
        except ShapingFailed as failure:
            kind = "refused" if isinstance(failure, ShapingRefused) else "failed"
            return RungResult(
                target, False, str(failure), source_sop_instance_uid=source_uid, unshapable=kind
            )
    try:
        encoded = part10_bytes(ds) if target is None else encode_for_target(ds, target)
    except VerificationMismatch as failure:
        return RungResult(target, False, str(failure), True, source_sop_instance_uid=source_uid)
    except RungFailed as failure:
        return RungResult(target, False, str(failure), source_sop_instance_uid=source_uid)
    except Exception as error:  # codec bugs must not stop the ladder
        reason = f"encoder error: {_short(error)}"
        return RungResult(target, False, reason, source_sop_instance_uid=source_uid)
    write_atomically(dst, encoded)
    return RungResult(
        target,
        ok=True,
        source_sop_instance_uid=source_uid,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        size=len(encoded),
        transfer_syntax=source_syntax if target is None else str(target.transfer_syntax),
    )


def read_source(src: Path) -> tuple[Dataset, str]:
    """The data set, and why it is truncated ("" when it is whole)."""
    # pydicom says "End of file reached" only as a warning. Recorded here (this runs in a
    # worker process, one rung at a time) and passed on, so logging still sees them.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = dcmread(src)
    truncation = ""
    for warning in caught:
        if "End of file reached" in str(warning.message) and not truncation:
            truncation = str(warning.message).split(" in file ")[0]
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return ds, truncation or _short_value(ds)


def _short_value(ds: Dataset) -> str:
    for raw in ds.elements():
        # A defined-length value (a sequence's too) that the file ends in the middle of.
        if (
            isinstance(raw, RawDataElement)
            and raw.value is not None
            and raw.length != _UNDEFINED_LENGTH
            and len(raw.value) < raw.length
        ):
            return f"{raw.tag} has {len(raw.value)} of its {raw.length} bytes"
    return ""


def encode_for_target(ds: Dataset, target: Target) -> bytes:
    """The Part 10 bytes of ds in target's syntax, verified. Modifies ds."""
    source_syntax = UID(ds.file_meta.TransferSyntaxUID)
    syntax = target.transfer_syntax
    native = syntax in NATIVE_SYNTAXES
    codec = None if native else codec_for(syntax)
    if not native and codec is None:
        raise RungFailed("no encoder for this syntax")
    if not syntax.is_little_endian:
        # Explicit VR Big Endian is retired (PS3.5 A.3) and our pixel path writes little
        # endian only; a big endian peer gets the instance as received or in another syntax.
        raise RungFailed("big endian syntaxes are not written (retired)")
    _convert_byte_order(ds, source_syntax, syntax)
    if syntax == ImplicitVRLittleEndian:
        private_sequences_of_undefined_length(ds)
    if pixel_keyword(ds) is None:
        if not native:
            raise RungFailed("no pixel data to compress")
        set_transfer_syntax(ds, syntax)
        return part10_bytes(ds)
    try:
        source = decode_pixels(ds)
    except Exception as error:
        raise RungFailed(f"source pixels cannot be decoded: {_short(error)}") from None
    keep_lossy_history(ds, source_syntax)
    if codec is None:
        return _native(ds, source, syntax)
    return _compressed(ds, source, target, codec)


def _native(ds: Dataset, source: DecodedPixels, syntax: UID) -> bytes:
    info = source.info
    set_native_pixels(ds, info, native_pixel_bytes(source), info.photometric_interpretation)
    set_transfer_syntax(ds, syntax)
    encoded = part10_bytes(ds)
    verify_lossless(encoded, source)
    return encoded


def _compressed(ds: Dataset, source: DecodedPixels, target: Target, codec: Codec) -> bytes:
    info = source.info
    problem = first_problem(info, target, codec.checks)
    if problem:
        raise RungFailed(problem)
    fragments = [codec.encode_frame(frame, info, target) for frame in source.frames()]
    photometric = written_photometric(info, target, fragments[0])
    set_encapsulated_pixels(ds, info, fragments, photometric)
    set_transfer_syntax(ds, target.transfer_syntax)
    if target.lossy and codec.method:
        ratio = uncompressed_size(info) / max(1, sum(len(f) for f in fragments))
        mark_lossy(ds, codec.method, ratio)
    encoded = part10_bytes(ds)
    if target.lossy:
        verify_lossy(encoded, source, target, codec.verifier)
    else:
        verify_lossless(encoded, source, codec.verifier)
    return encoded


def _convert_byte_order(ds: Dataset, source_syntax: UID, syntax: UID) -> None:
    # Before the pixel path, which converts the top-level pixel data itself.
    try:
        convert_byte_order(ds, source_syntax, syntax)
    except ByteOrderError as error:
        raise RungFailed(f"cannot convert byte order: {error}") from None


def written_photometric(info: PixelInfo, target: Target, first_fragment: bytes) -> str:
    """Photometric Interpretation of the bytes the codec produced (PS3.5 8.2)."""
    pi = info.photometric_interpretation
    if info.samples_per_pixel != 3:
        return pi
    if target.transfer_syntax.keyword.startswith(("JPEG2000", "HTJ2K")):
        mct, reversible = j2k_colour_transform(first_fragment)
        if mct:
            return "YBR_RCT" if reversible else "YBR_ICT"
        return pi
    if target.transfer_syntax.keyword == "JPEGBaseline8Bit":
        return "YBR_FULL_422"
    return pi


def uncompressed_size(info: PixelInfo) -> int:
    pixels = info.rows * info.columns * info.samples_per_pixel * info.number_of_frames
    return pixels * info.bits_allocated // 8


def part10_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}"[:200]
