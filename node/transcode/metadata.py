"""Data set attributes that must follow the pixel bytes we write (PS3.3 C.7.6.3, C.7.6.1)."""

from __future__ import annotations

from pydicom import uid as _uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, generate_uid

from node.transcode.pixels import PIXEL_KEYWORDS, PixelInfo

# Offset tables describe the old fragments; they are wrong for anything we write.
_STALE_ELEMENTS = ("ExtendedOffsetTable", "ExtendedOffsetTableLengths")

# Syntaxes that are lossy whatever their parameters: decoding them is not the original.
_ALWAYS_LOSSY_SOURCES = (_uid.JPEGBaseline8Bit, _uid.JPEGExtended12Bit, _uid.JPEGLSNearLossless)

_NATIVE_VR = {"PixelData": None, "FloatPixelData": "OF", "DoubleFloatPixelData": "OD"}


def set_transfer_syntax(ds: Dataset, syntax: UID) -> None:
    ds.file_meta.TransferSyntaxUID = syntax


def set_native_pixels(ds: Dataset, info: PixelInfo, data: bytes, photometric: str) -> None:
    keyword = info.pixel_keyword
    vr = _NATIVE_VR[keyword] or ("OW" if info.bits_allocated > 8 else "OB")
    _drop_pixel_elements(ds)
    ds.add_new(keyword, vr, data)
    _set_image_pixel_module(ds, info, photometric)


def set_encapsulated_pixels(
    ds: Dataset, info: PixelInfo, fragments: list[bytes], photometric: str
) -> None:
    _drop_pixel_elements(ds)
    ds.add_new("PixelData", "OB", encapsulate(fragments, has_bot=True))
    ds["PixelData"].is_undefined_length = True
    _set_image_pixel_module(ds, info, photometric)


def _drop_pixel_elements(ds: Dataset) -> None:
    for keyword in (*PIXEL_KEYWORDS, *_STALE_ELEMENTS):
        if keyword in ds:
            del ds[keyword]


def _set_image_pixel_module(ds: Dataset, info: PixelInfo, photometric: str) -> None:
    ds.PhotometricInterpretation = photometric
    # Every array we write is interleaved (colour-by-pixel).
    if info.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0


def keep_lossy_history(ds: Dataset, source_syntax: UID) -> None:
    """A decompressed lossy image stays marked lossy (Lossy Image Compression is never reset)."""
    if source_syntax in _ALWAYS_LOSSY_SOURCES and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"


def mark_lossy(ds: Dataset, method: str, ratio: float) -> str:
    """Record one more lossy step and give the instance a new identity. Returns the new UID."""
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*_values(ds, "LossyImageCompressionRatio"), f"{ratio:.4g}"]
    ds.LossyImageCompressionMethod = [*_values(ds, "LossyImageCompressionMethod"), method]
    image_type = _values(ds, "ImageType") or ["DERIVED", "SECONDARY"]
    ds.ImageType = ["DERIVED", *image_type[1:]]
    new_uid = generate_uid()
    ds.SOPInstanceUID = new_uid
    ds.file_meta.MediaStorageSOPInstanceUID = new_uid
    return new_uid


def _values(ds: Dataset, keyword: str) -> list[str]:
    if keyword not in ds or ds[keyword].value in (None, ""):
        return []
    value = ds[keyword].value
    items = list(value) if ds[keyword].VM > 1 else [value]
    return [str(item) for item in items]


def private_sequences_of_undefined_length(ds: Dataset) -> None:
    """In Implicit VR a reader without the private dictionary can tell a private sequence
    from a byte value only by its undefined length (PS3.5 7.5, DICOM CP 246): without it,
    the sequence's items would be read back as UN bytes."""
    for element in ds:
        if element.VR == "SQ":
            if element.tag.is_private:
                element.is_undefined_length = True
            for item in element.value or ():
                private_sequences_of_undefined_length(item)
