"""Registry of encoders by transfer syntax, with a test hook to swap one for another.

The hook works across process start methods: overrides are plain "module:function"
strings that the pool sends with every task and the worker installs before encoding.
Setting DICOM_NODE_TEST_ABORT_CODEC=<uid>[,<uid>...] in the parent makes those
syntaxes' encoders call os.abort(), as a crashing C codec would.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
from pydicom import uid as _uid
from pydicom.uid import UID

from node.transcode import capabilities as can
from node.transcode import encoders as enc
from node.transcode.pixels import PixelInfo
from node.transcode.targets import Target

EncodeFrame = Callable[[np.ndarray, PixelInfo, Target], bytes]

ABORT_ENV = "DICOM_NODE_TEST_ABORT_CODEC"
ABORT_ENCODER = "node.transcode.codecs:abort_encoder"


@dataclass(frozen=True)
class Codec:
    library: str
    checks: tuple[can.Check, ...]
    encode_frame: EncodeFrame
    # pydicom decoding plugin that verifies the output. It must not share code with
    # `library`: one bug on both sides of a library could cancel out and pass.
    verifier: str
    method: str | None = None  # Lossy Image Compression Method defined term


_J2K = "ISO_15444_1"
_HTJ2K = "ISO_15444_15"

# pydicom plugin names, and the library each one decodes these syntaxes with.
_LIBJPEG = "pylibjpeg"  # pylibjpeg-libjpeg (Thomas Richter's libjpeg) for JPEG and JPEG-LS
_OPENJPEG = "pylibjpeg"  # pylibjpeg-openjpeg for JPEG 2000 and HTJ2K
_PYDICOM_RLE = "pydicom"  # pydicom's own RLE decoder, in Python and numpy

_CODECS: dict[UID, Codec] = {
    # Slower than pylibjpeg-rle's decoder, but that is the encoder's own library.
    _uid.RLELossless: Codec("pylibjpeg-rle", can.RLE_CHECKS, enc.encode_rle, _PYDICOM_RLE),
    _uid.JPEGLSLossless: Codec(
        "imagecodecs CharLS", can.JPEG_FAMILY_CHECKS, enc.encode_jpegls, _LIBJPEG
    ),
    # No JPEG 2000 Part 1 decoder but OpenJPEG is installed, so this one is checked by
    # another build of the same library: it still catches wrapper and parameter bugs.
    _uid.JPEG2000Lossless: Codec(
        "imagecodecs OpenJPEG", can.JPEG_FAMILY_CHECKS, enc.encode_j2k_lossless, _OPENJPEG
    ),
    _uid.HTJ2KLossless: Codec(
        "imagecodecs OpenJPH", can.JPEG_FAMILY_CHECKS, enc.encode_htj2k_lossless, _OPENJPEG
    ),
    _uid.HTJ2KLosslessRPCL: Codec(
        "imagecodecs OpenJPH", can.JPEG_FAMILY_CHECKS, enc.encode_htj2k_rpcl, _OPENJPEG
    ),
    _uid.JPEGLosslessSV1: Codec(
        "imagecodecs libjpeg-turbo", can.LOSSLESS_JPEG_CHECKS, enc.encode_jpeg_sv1, _LIBJPEG
    ),
    _uid.JPEGLSNearLossless: Codec(
        "imagecodecs CharLS",
        can.NEAR_LOSSLESS_CHECKS,
        enc.encode_jpegls,
        _LIBJPEG,
        "ISO_14495_1",
    ),
    _uid.JPEG2000: Codec(
        "pylibjpeg-openjpeg", can.J2K_LOSSY_CHECKS, enc.encode_j2k_lossy, _OPENJPEG, _J2K
    ),
    _uid.HTJ2K: Codec(
        "imagecodecs OpenJPH", can.J2K_LOSSY_CHECKS, enc.encode_htj2k_lossy, _OPENJPEG, _HTJ2K
    ),
    _uid.JPEGBaseline8Bit: Codec(
        "imagecodecs libjpeg-turbo",
        can.BASELINE_CHECKS,
        enc.encode_jpeg_baseline,
        _LIBJPEG,
        "ISO_10918_1",
    ),
}

_overrides: dict[str, str] = {}


def codec_for(syntax: UID) -> Codec | None:
    """The encoder for a compressed syntax (None for native syntaxes and unknown ones)."""
    codec = _CODECS.get(syntax)
    override = _overrides.get(str(syntax))
    if codec is not None and override:
        codec = replace(codec, encode_frame=_load(override), library=override)
    return codec


def abort_encoder(frame: np.ndarray, info: PixelInfo, target: Target) -> bytes:
    """Test encoder that kills its process the way a failing C++ codec does."""
    os.abort()


def current_overrides() -> dict[str, str]:
    """Overrides to send to a worker: registered ones plus the abort environment hook."""
    found = dict(_overrides)
    for syntax in filter(None, os.environ.get(ABORT_ENV, "").split(",")):
        found[syntax.strip()] = ABORT_ENCODER
    return found


def install_overrides(overrides: Mapping[str, str]) -> None:
    _overrides.clear()
    _overrides.update(overrides)


@contextmanager
def overridden_encoder(syntax: str, dotted: str) -> Iterator[None]:
    """Use the encoder at "module:function" for syntax while the block runs."""
    previous = dict(_overrides)
    _overrides[str(syntax)] = dotted
    try:
        yield
    finally:
        install_overrides(previous)


def _load(dotted: str) -> EncodeFrame:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)
