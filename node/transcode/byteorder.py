"""Byte order of the values pydicom keeps as bytes, when a data set changes endianness.

pydicom parses US, SS, UL, SL, FL, FD, AT, UV, SV values into numbers, so they are
written in whatever byte order the output has. The "other" VRs stay raw bytes in the
byte order they were read in, and pydicom writes them unchanged: an Explicit VR Big
Endian source written as a little endian syntax would keep every OW/OF/OD/OL/OV value
swapped (Palette and Segmented LUT Data, Overlay Data, Waveform Data, private OW).
This module swaps them as DCMTK does (PS3.5 7.3: OW values are 16-bit words, OF and
OL 32-bit, OD and OV 64-bit), in nested sequences too.

Left as they are, on purpose:
- OB and UN: byte streams, no byte order (PS3.5 6.2). DCMTK does not swap them
  either. A UN element keeps VR UN and its bytes even when the tag is known to the
  dictionary: pydicom would otherwise reinterpret it in the source byte order.
- The top-level Pixel Data, Float Pixel Data and Double Float Pixel Data: the pixel
  path decodes them to arrays and writes them again in the target's byte order.
  Pixel Data nested in a sequence (an Icon Image) is swapped as the OW it is.
- Ambiguous VRs ("US or SS", "US or OW", "US or SS or OW", "OB or OW") only occur in
  sources without explicit VRs, which are little endian; Explicit VR Big Endian states
  the VR of every element. pydicom resolves them on write (PS3.5 Annex A).
"""

from __future__ import annotations

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.valuerep import VR

from node.transcode.pixels import PIXEL_KEYWORDS

# Bytes per value of the VRs whose values pydicom keeps as raw bytes (PS3.5 Table 6.2-1).
SWAP_WIDTHS: dict[str, int] = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}

_ROOT_PIXEL_TAGS = {tag_for_keyword(keyword) for keyword in PIXEL_KEYWORDS}


class ByteOrderError(ValueError):
    """A value cannot be converted: its length is not a whole number of values."""


def is_little_endian(syntax: UID) -> bool:
    return bool(syntax.is_little_endian)


def needs_byte_order_change(source: UID, target: UID) -> bool:
    return is_little_endian(source) != is_little_endian(target)


def convert_byte_order(ds: Dataset, source: UID, target: UID) -> int:
    """Rewrite ds's raw-byte values from source's byte order to target's, in place.
    Returns how many values were swapped; does nothing when the byte order is the same."""
    if not needs_byte_order_change(source, target):
        return 0
    return _swap_dataset(ds, is_root=True)


def swap_values(data: bytes, width: int) -> bytes:
    """Reverse the bytes of every `width`-byte value in data."""
    if len(data) % width:
        raise ByteOrderError(f"{len(data)} bytes is not a whole number of {width}-byte values")
    if width == 1 or not data:
        return data
    swapped = bytearray(len(data))
    for offset in range(width):
        # Byte `offset` of each value goes to position width-1-offset.
        swapped[width - 1 - offset :: width] = data[offset::width]
    return bytes(swapped)


def _swap_dataset(ds: Dataset, *, is_root: bool) -> int:
    swapped = 0
    for tag in list(ds.keys()):
        if is_root and tag in _ROOT_PIXEL_TAGS:
            continue
        element = _parsed(ds, tag)
        if element.VR == "SQ":
            for item in element.value or ():
                swapped += _swap_dataset(item, is_root=False)
            continue
        width = SWAP_WIDTHS.get(str(element.VR))
        if width and isinstance(element.value, bytes | bytearray) and element.value:
            try:
                element.value = swap_values(bytes(element.value), width)
            except ByteOrderError as error:
                raise ByteOrderError(f"{element.tag} {element.VR}: {error}") from None
            swapped += 1
    return swapped


def _parsed(ds: Dataset, tag: int) -> DataElement:
    raw = ds.get_item(tag)
    if isinstance(raw, RawDataElement) and raw.VR == "UN" and raw.length != 0xFFFFFFFF:
        # Kept as UN bytes (see the module docstring), not converted to the dictionary VR.
        element = DataElement(raw.tag, "UN", b"")
        element.VR = VR.UN  # the constructor swaps in the dictionary VR for a known tag
        element.value = raw.value or b""
        ds[raw.tag] = element
        return element
    return ds[tag]
