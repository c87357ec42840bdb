"""Shared helpers for the transcode tests: source decoding, independent decoders."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

import imagecodecs
import numpy as np
from pydicom import dcmread
from pydicom import uid as _uid
from pydicom.encaps import generate_frames
from pydicom.uid import UID

from node.transcode.pixels import DecodedPixels, decode_pixels, same_pixels
from tests.tools import have_tool

# syntax -> command that decompresses IN to OUT (a native file), from another code base.
_TOOLS: dict[UID, list[str]] = {
    _uid.JPEGLSLossless: ["dcmdjpls"],
    _uid.RLELossless: ["dcmdrle"],
    _uid.JPEGLosslessSV1: ["dcmdjpeg"],
    _uid.JPEG2000Lossless: ["gdcmconv", "--raw"],
    # gdcmconv (GDCM 3.0) cannot read HTJ2K; OpenJPH via imagecodecs is our
    # independent decoder there (pydicom decodes HTJ2K with OpenJPEG).
}
_HTJ2K = (_uid.HTJ2KLossless, _uid.HTJ2KLosslessRPCL)


@cache
def source_pixels(path: Path) -> DecodedPixels | None:
    try:
        return decode_pixels(dcmread(path))
    except Exception:
        return None


def our_decode(path: Path) -> DecodedPixels:
    return decode_pixels(dcmread(path))


def has_independent_decoder(syntax: UID) -> bool:
    if syntax in _HTJ2K:
        return True
    tool = _TOOLS.get(syntax)
    return bool(tool and have_tool(tool[0]))


def independent_check(path: Path, expected: DecodedPixels, workdir: Path) -> str:
    """Decode path with a decoder outside pydicom's plugin stack and compare values.

    Returns "match", "mismatch", "tool failed" (the tool cannot decode it: a tool
    limitation, our decoder already verified it) or "tool converted colour" (e.g. dcmdjpeg
    turns YBR_FULL into RGB, which cannot be compared by value).
    """
    written = dcmread(path, stop_before_pixels=True)
    syntax = UID(written.file_meta.TransferSyntaxUID)
    if syntax in _HTJ2K:
        return "match" if _openjph_matches(path, expected) else "mismatch"
    out = workdir / (path.name + ".native.dcm")
    done = subprocess.run([*_TOOLS[syntax], str(path), str(out)], capture_output=True)
    try:
        if done.returncode != 0:
            return "tool failed"
        decoded = our_decode(out)
        if decoded.info.photometric_interpretation != written.PhotometricInterpretation and (
            written.PhotometricInterpretation.startswith("YBR_FULL")
        ):
            return "tool converted colour"
        return "match" if same_pixels(decoded.array, expected.array) else "mismatch"
    finally:
        out.unlink(missing_ok=True)


def _openjph_matches(path: Path, expected: DecodedPixels) -> bool:
    ds = dcmread(path)
    frames = generate_frames(ds.PixelData, number_of_frames=expected.info.number_of_frames)
    decoded = np.stack([_interleaved(imagecodecs.htj2k_decode(frame)) for frame in frames])
    if decoded.shape != expected.array.shape:
        return False
    decoded = decoded.astype(expected.array.dtype)
    return same_pixels(decoded, expected.array)


def _interleaved(frame: np.ndarray) -> np.ndarray:
    # OpenJPH returns components first when no colour transform was used.
    if frame.ndim == 3 and frame.shape[0] in (3, 4) and frame.shape[-1] not in (3, 4):
        return np.moveaxis(frame, 0, -1)
    return frame
