"""Decoding source pixels into arrays, and comparing decoded arrays by value."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom import uid as _uid
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, pack_bits
from pydicom.uid import UID

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# For these the colour transform is part of the (lossy) codec: DICOM viewers show
# the decoded RGB, so that is what we keep and label as RGB.
_CODEC_OWNS_COLOUR = (_uid.JPEGBaseline8Bit, _uid.JPEGExtended12Bit)


@dataclass(frozen=True)
class PixelInfo:
    """Image Pixel module values describing a decoded array (not the source bytes)."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    number_of_frames: int
    pixel_keyword: str

    @property
    def is_float(self) -> bool:
        return self.pixel_keyword != "PixelData"

    @property
    def is_signed(self) -> bool:
        return self.pixel_representation == 1


@dataclass(frozen=True)
class DecodedPixels:
    """All frames as one array shaped (frames, rows, columns[, samples]), interleaved."""

    array: np.ndarray
    info: PixelInfo

    def frames(self) -> list[np.ndarray]:
        return [np.ascontiguousarray(frame) for frame in self.array]


def pixel_keyword(ds: Dataset) -> str | None:
    return next((kw for kw in PIXEL_KEYWORDS if kw in ds), None)


def decode_pixels(ds: Dataset, plugin: str = "") -> DecodedPixels:
    """Decode every frame of ds, with pydicom's decoding plugin named `plugin` only (any
    available one when empty). Raises (any exception) when the pixels cannot be decoded."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    as_rgb = syntax in _CODEC_OWNS_COLOUR
    # pydicom annotates **kwargs as DecodeOptions where it means Unpack[DecodeOptions]
    array, meta = get_decoder(syntax).as_array(ds, as_rgb=as_rgb, decoding_plugin=plugin)  # type: ignore[arg-type]
    info = _info_from(ds, meta)
    # pydicom drops the frame axis for single frames; we always keep it.
    frame_ndim = 2 if info.samples_per_pixel == 1 else 3
    if array.ndim == frame_ndim:
        array = array[np.newaxis]
    return DecodedPixels(_native_byte_order(array), info)


def _info_from(ds: Dataset, meta: dict[str, str | int]) -> PixelInfo:
    keyword = pixel_keyword(ds) or "PixelData"
    return PixelInfo(
        rows=int(meta["rows"]),
        columns=int(meta["columns"]),
        samples_per_pixel=int(meta["samples_per_pixel"]),
        bits_allocated=int(meta["bits_allocated"]),
        bits_stored=int(meta.get("bits_stored", meta["bits_allocated"])),
        pixel_representation=int(meta.get("pixel_representation", 0)),
        photometric_interpretation=str(meta["photometric_interpretation"]),
        number_of_frames=int(meta.get("number_of_frames", 1) or 1),
        pixel_keyword=keyword,
    )


def _native_byte_order(array: np.ndarray) -> np.ndarray:
    # Big endian sources decode to '>' arrays; codecs want native order values.
    if array.dtype.byteorder == ">":
        return array.astype(array.dtype.newbyteorder("="))
    return array


def same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    """True when both arrays hold the same values in the same kind of samples."""
    if a.shape != b.shape:
        return False
    if a.dtype.kind != b.dtype.kind or a.dtype.itemsize != b.dtype.itemsize:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def native_pixel_bytes(pixels: DecodedPixels) -> bytes:
    """Little endian, interleaved (Planar Configuration 0), even-length native Pixel Data."""
    info = pixels.info
    if info.bits_allocated == 1:
        data = pack_bits(pixels.array.astype(np.uint8))
    else:
        dtype = pixels.array.dtype.newbyteorder("<")
        data = pixels.array.astype(dtype, copy=False).tobytes()
    return data + b"\0" if len(data) % 2 else data


def as_stored_unsigned(frame: np.ndarray, info: PixelInfo) -> np.ndarray:
    """Signed samples as the unsigned Bits Stored bit pattern, which is what JPEG and
    JPEG-LS code (they have no notion of sign; the decoder sign-extends)."""
    if not info.is_signed:
        return frame
    unsigned = frame.view(frame.dtype.str.replace("i", "u"))
    return unsigned & np.asarray((1 << info.bits_stored) - 1, dtype=unsigned.dtype)
