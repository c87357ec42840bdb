"""What intake needs from a received dataset, read without decoding pixels.

pydicom reads a truncated dataset without complaint (a short Pixel Data value
comes back as-is), so before acknowledging we walk the element structure
ourselves: every length must fit, every undefined-length sequence must close.
The walk touches only element headers, never values.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO, cast

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

PIXEL_DATA = 0x7FE00010
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
# Explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
MAX_DEPTH = 32
HEADER_SPAN = 16 * 1024 * 1024
# Deflate reaches ratios near 1000:1, so a 1 MB C-STORE could inflate to 1 GB.
# Without limits.max_instance_size, inflating stops here.
DEFAULT_INFLATE_LIMIT = 256 * 1024 * 1024


class DatasetError(ValueError):
    """The received bytes are not a well-formed dataset in the negotiated transfer syntax."""


def inflate(data: bytes | memoryview, limit: int = DEFAULT_INFLATE_LIMIT) -> bytes:
    """Undo Deflated Explicit VR Little Endian (raw deflate, no zlib header), up to `limit` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise DatasetError(f"deflated dataset does not inflate: {exc}") from None
    if len(inflated) > limit or inflater.unconsumed_tail:
        raise DatasetError(f"deflated dataset inflates to more than {limit} bytes")
    return inflated


class _Walker:
    def __init__(self, data: bytes | memoryview, implicit_vr: bool, little_endian: bool) -> None:
        self.data = memoryview(data)
        self.implicit_vr = implicit_vr
        self.prefix = "<" if little_endian else ">"

    def _unpack(self, fmt: str, offset: int) -> tuple[int, ...]:
        size = struct.calcsize(self.prefix + fmt)
        if offset + size > len(self.data):
            raise DatasetError(f"dataset ends inside an element header at byte {offset}")
        return struct.unpack_from(self.prefix + fmt, self.data, offset)

    def element(self, offset: int) -> tuple[int, bytes | None, int, int]:
        """Return (tag, VR, value length, value offset) of the element at offset."""
        group, elem = self._unpack("HH", offset)
        tag = (group << 16) | elem
        if tag in (ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER) or self.implicit_vr:
            (length,) = self._unpack("L", offset + 4)
            return tag, None, length, offset + 8
        vr = bytes(self.data[offset + 4 : offset + 6])
        if vr in LONG_VRS:
            (length,) = self._unpack("L", offset + 8)
            return tag, vr, length, offset + 12
        if not vr.isalpha():
            raise DatasetError(f"invalid VR {vr!r} at byte {offset} (tag {tag:08X})")
        (length,) = self._unpack("H", offset + 6)
        return tag, vr, length, offset + 8

    def dataset(self, offset: int, end: int, depth: int, in_item: bool) -> int:
        """Walk elements from offset to end (or an item delimiter); return where it stopped."""
        if depth > MAX_DEPTH:
            raise DatasetError(f"sequences nested deeper than {MAX_DEPTH}")
        while offset < end:
            tag, vr, length, value = self.element(offset)
            if tag == ITEM_DELIMITER and in_item:
                return value
            if tag >> 16 == 0xFFFE:
                raise DatasetError(f"unexpected delimiter {tag:08X} at byte {offset}")
            if length == UNDEFINED:
                offset = self.undefined_value(value, end, depth, tag, vr)
                continue
            if value + length > end:
                raise DatasetError(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) claims {length} bytes"
                    f" but only {end - value} remain: the dataset is truncated"
                )
            offset = value + length
        if in_item:
            raise DatasetError("an undefined-length item has no item delimiter")
        return offset

    def undefined_value(self, offset: int, end: int, depth: int, tag: int, vr: bytes | None) -> int:
        """Walk the items of an undefined-length sequence or encapsulated pixel data."""
        encapsulated = tag == PIXEL_DATA
        if vr not in (None, b"SQ", b"UN") and not encapsulated:
            raise DatasetError(f"undefined length on a {vr!r} element ({tag:08X})")
        while offset < end:
            item_tag, _, length, value = self.element(offset)
            if item_tag == SEQUENCE_DELIMITER:
                return value
            if item_tag != ITEM:
                raise DatasetError(f"expected an item in ({tag:08X}) at byte {offset}")
            if length == UNDEFINED and not encapsulated:
                offset = self.dataset(value, end, depth + 1, in_item=True)
                continue
            if length == UNDEFINED or value + length > end:
                raise DatasetError(
                    f"an item of ({tag:08X}) runs past the end: the dataset is truncated"
                )
            offset = value + length
        raise DatasetError(
            f"sequence ({tag:08X}) has no sequence delimiter: the dataset is truncated"
        )


def check_structure(data: bytes | memoryview, transfer_syntax: UID) -> None:
    """Raise DatasetError unless every element of the dataset fits in the bytes received."""
    if not data:
        raise DatasetError("the dataset is empty")
    walker = _Walker(data, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
    walker.dataset(0, len(data), depth=0, in_item=False)


def _stop_at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag >= PIXEL_DATA


def read_header(data: bytes | memoryview, transfer_syntax: UID) -> Dataset:
    """Parse the elements before Pixel Data: enough for routing, layout and checks."""
    # BytesIO shares a bytes object without copying; anything else is copied,
    # but only up to HEADER_SPAN, so a multi-GB instance is not duplicated.
    head = (
        data if isinstance(data, bytes) and len(data) <= HEADER_SPAN else bytes(data[:HEADER_SPAN])
    )
    fp = DicomBytesIO(head)
    fp.is_little_endian = transfer_syntax.is_little_endian
    fp.is_implicit_VR = transfer_syntax.is_implicit_VR
    try:
        return read_dataset(
            cast(BinaryIO, fp),  # annotated BinaryIO, written for pydicom's own DicomIO
            transfer_syntax.is_implicit_VR,
            transfer_syntax.is_little_endian,
            stop_when=_stop_at_pixel_data,
            defer_size=4096,
        )
    except Exception as exc:  # pydicom raises many types for garbage; all mean "unparseable"
        raise DatasetError(f"the dataset cannot be parsed: {exc}") from None


def decode_received(
    data: bytes | memoryview, transfer_syntax: UID, max_size: int = 0
) -> tuple[bytes | memoryview, UID]:
    """The bytes to walk and parse: inflated for the deflated syntax, else as received.

    max_size (limits.max_instance_size; 0 for none) also bounds the inflated size.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return inflate(data, max_size or DEFAULT_INFLATE_LIMIT), transfer_syntax
    return data, transfer_syntax
