"""Decode what we wrote and compare it with the source pixels before anyone sees it."""

from __future__ import annotations

import io

import numpy as np
from pydicom import dcmread

from node.transcode.pixels import DecodedPixels, decode_pixels, same_pixels
from node.transcode.targets import Target


class RungFailed(Exception):
    """This rung cannot hold the image; the message is the one-line reason."""


class VerificationMismatch(RungFailed):
    """The written pixels do not decode to the source pixels."""


def decode_written(encoded: bytes, plugin: str = "") -> DecodedPixels:
    """Decode our output with pydicom's plugin `plugin` and no other: pydicom would
    otherwise try the next plugin when one fails, which can be the encoder's own library."""
    try:
        return decode_pixels(dcmread(io.BytesIO(encoded)), plugin)
    except Exception as error:
        raise VerificationMismatch(
            f"verification failed: output does not decode ({error})"
        ) from None


def verify_lossless(encoded: bytes, source: DecodedPixels, plugin: str = "") -> None:
    written = decode_written(encoded, plugin)
    if not same_pixels(written.array, source.array):
        raise VerificationMismatch("verification mismatch: decoded pixels differ from source")


def verify_lossy(encoded: bytes, source: DecodedPixels, target: Target, plugin: str = "") -> None:
    written = decode_written(encoded, plugin)
    if written.array.shape != source.array.shape:
        raise VerificationMismatch(
            f"verification mismatch: shape {written.array.shape} != {source.array.shape}"
        )
    if target.near_lossless is not None:
        error = max_abs_error(written.array, source.array)
        if error > target.near_lossless:
            raise VerificationMismatch(
                f"verification mismatch: error {error} exceeds NEAR {target.near_lossless}"
            )


def max_abs_error(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64)), initial=0))
