"""What intake needs from a received dataset, read without decoding pixels.

pydicom reads a truncated dataset without complaint (a short Pixel Data value
comes back as-is), so before acknowledging we walk the element structure
ourselves: every length must fit, every sequence and item must close inside
its parent, every VR must be one PS3.5 defines, and every value pydicom turns
into numbers must hold a whole number of them. The walk touches only element
headers, never values.

The boundary with hostile bytes is DatasetError: the walker raises it, and
read_header turns whatever pydicom raises while parsing, or later while
converting a header value on first access, into it (PARSE_ERRORS). Intake
answers it with 0xC210; anything else is a bug of ours and aborts.
"""

from __future__ import annotations

import struct
import zlib
from functools import lru_cache
from typing import Any, BinaryIO, cast

from pydicom.datadict import get_entry
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

PIXEL_DATA = 0x7FE00010
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
# Explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2), as the
# walker meets them: bytes.
LONG_VRS = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)
# Every VR of PS3.5 Table 6.2-1. An unknown code is refused: nothing says
# whether its length field has 2 bytes or 4, so the rest of the walk would be
# a guess (and pydicom cannot convert its value).
KNOWN_VRS = frozenset(
    {
        *LONG_VRS,
        *(b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO"),
        *(b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"),
    }
)
# VRs whose values pydicom converts to numbers: a length that is not a whole
# number of values cannot be converted (BytesLengthException).
VALUE_SIZES = {
    b"AT": 4,
    b"FD": 8,
    b"FL": 4,
    b"SL": 4,
    b"SS": 2,
    b"SV": 8,
    b"UL": 4,
    b"US": 2,
    b"UV": 8,
}
# Explicit VRs whose values the walk looks into; for UN (and implicit VR) the
# data dictionary says what pydicom will make of the value.
SHAPED_VRS = frozenset({*VALUE_SIZES, b"SQ", b"UN"})
MAX_DEPTH = 32
HEADER_SPAN = 16 * 1024 * 1024
# Deflate reaches ratios near 1000:1, so a 1 MB C-STORE could inflate to 1 GB.
# Without limits.max_instance_size, inflating stops here.
DEFAULT_INFLATE_LIMIT = 256 * 1024 * 1024


class DatasetError(ValueError):
    """The received bytes are not a well-formed dataset in the negotiated transfer syntax."""


# What pydicom raises on hostile bytes while parsing a dataset or converting a
# value. Seen by fuzzing (tests/ingest/test_fuzz.py, tests/ingest/test_fuzz_wire.py) before
# the walker refused their causes: NotImplementedError (an unknown VR),
# BytesLengthException (a value that is not a whole number of numbers),
# OSError wrapping struct.error (a sequence that ends early), AttributeError
# (a deferred value with nothing to re-read it from). The others are what
# pydicom's readers and converters raise for bytes that do not fit: ValueError
# (UnicodeDecodeError among them), EOFError, StopIteration (a deferred re-read
# at the end), KeyError, IndexError and TypeError (resolving an ambiguous VR),
# OverflowError, RecursionError. AttributeError must be among them: Dataset.get()
# would turn it into "absent" and routing would silently see an empty value.
# These are caught around pydicom's parsing and conversion alone, never wider:
# elsewhere the same types are bugs of ours.
PARSE_ERRORS: tuple[type[BaseException], ...] = (
    NotImplementedError,
    BytesLengthException,
    OSError,
    AttributeError,
    EOFError,
    struct.error,
    StopIteration,
    ValueError,
    LookupError,
    TypeError,
    OverflowError,
    RecursionError,
)


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
        self.size = len(self.data)
        self.implicit_vr = implicit_vr
        prefix = "<" if little_endian else ">"
        self._tag = struct.Struct(prefix + "HH")
        self._short = struct.Struct(prefix + "H")
        self._long = struct.Struct(prefix + "L")
        self._un_contents: _Walker | None = None

    def _unpack(self, field: struct.Struct, offset: int) -> tuple[int, ...]:
        if offset + field.size > self.size:
            raise DatasetError(f"dataset ends inside an element header at byte {offset}")
        return field.unpack_from(self.data, offset)

    def element(self, offset: int) -> tuple[int, bytes | None, int, int]:
        """Return (tag, VR, value length, value offset) of the element at offset."""
        group, elem = self._unpack(self._tag, offset)
        tag = (group << 16) | elem
        if tag in (ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER) or self.implicit_vr:
            (length,) = self._unpack(self._long, offset + 4)
            return tag, None, length, offset + 8
        vr = bytes(self.data[offset + 4 : offset + 6])
        if vr in LONG_VRS:
            (length,) = self._unpack(self._long, offset + 8)
            return tag, vr, length, offset + 12
        if vr not in KNOWN_VRS:
            raise DatasetError(f"unknown VR {_printable(vr)} in {_tag(tag)} at byte {offset}")
        (length,) = self._unpack(self._short, offset + 6)
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
                raise DatasetError(f"unexpected delimiter {_tag(tag)} at byte {offset}")
            if length == UNDEFINED:
                offset = self.undefined_value(value, end, depth, tag, vr)
                continue
            if value > end:
                raise DatasetError(f"the header of {_tag(tag)} runs past the end of its item")
            if value + length > end:
                raise DatasetError(
                    f"element {_tag(tag)} claims {length} bytes"
                    f" but only {end - value} remain: the dataset is truncated"
                )
            if vr is None or vr in SHAPED_VRS:
                self.defined_value(value, length, depth, tag, vr)
            offset = value + length
        if in_item:
            raise DatasetError("an undefined-length item has no item delimiter")
        return offset

    def defined_value(
        self, offset: int, length: int, depth: int, tag: int, vr: bytes | None
    ) -> None:
        """Check what pydicom will need of a value: whole numbers, items that fit."""
        known = vr if vr not in (None, b"UN") else _dictionary_vr(tag)
        size = VALUE_SIZES.get(known or b"")
        if size and length % size:
            raise DatasetError(
                f"{_tag(tag)} is {known.decode() if known else '?'} but its {length} bytes"
                f" are not a whole number of {size}-byte values"
            )
        if known == b"SQ" and length:
            self.contents_walker(vr).items(offset, offset + length, depth, tag)

    def contents_walker(self, vr: bytes | None) -> _Walker:
        """Items of an SQ are in the dataset's encoding; items of a UN are Implicit VR LE."""
        if vr != b"UN" or self.implicit_vr:
            return self
        if self._un_contents is None:
            self._un_contents = _Walker(self.data, implicit_vr=True, little_endian=True)
        return self._un_contents

    def items(self, offset: int, end: int, depth: int, tag: int) -> None:
        """Walk the items of a defined-length sequence: each must end inside it."""
        while offset < end:
            item_tag, _, length, value = self.element(offset)
            if item_tag != ITEM:
                raise DatasetError(f"expected an item in {_tag(tag)} at byte {offset}")
            if length == UNDEFINED:
                offset = self.dataset(value, end, depth + 1, in_item=True)
                continue
            if value + length > end:
                raise DatasetError(f"an item of {_tag(tag)} runs past the end of its sequence")
            self.dataset(value, value + length, depth + 1, in_item=False)
            offset = value + length

    def undefined_value(self, offset: int, end: int, depth: int, tag: int, vr: bytes | None) -> int:
        """Walk the items of an undefined-length sequence or encapsulated pixel data."""
        encapsulated = tag == PIXEL_DATA
        if vr not in (None, b"SQ", b"UN") and not encapsulated:
            raise DatasetError(
                f"undefined length on {_tag(tag)}, whose VR is {_printable(vr or b'')}"
            )
        contents = self if encapsulated else self.contents_walker(vr)
        while offset < end:
            item_tag, _, length, value = contents.element(offset)
            if item_tag == SEQUENCE_DELIMITER:
                return value
            if item_tag != ITEM:
                raise DatasetError(f"expected an item in {_tag(tag)} at byte {offset}")
            if length == UNDEFINED and not encapsulated:
                offset = contents.dataset(value, end, depth + 1, in_item=True)
                continue
            if length == UNDEFINED or value + length > end:
                raise DatasetError(
                    f"an item of {_tag(tag)} runs past the end: the dataset is truncated"
                )
            if not encapsulated:
                contents.dataset(value, value + length, depth + 1, in_item=False)
            offset = value + length
        raise DatasetError(
            f"sequence {_tag(tag)} has no sequence delimiter: the dataset is truncated"
        )


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> bytes | None:
    """The VR the data dictionary gives a public tag, as far as the walk needs it."""
    if tag >> 16 & 1:
        return None  # private: its VR depends on the private creator
    if tag & 0xFFFF == 0:
        return b"UL"  # group length
    try:
        vr = get_entry(tag)[0]
    except KeyError:
        return None
    # "US or SS", "US or OW", "US or SS or OW": every choice is read in 2-byte words.
    return b"US" if vr.startswith("US or") else vr.encode("ascii")


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _printable(vr: bytes) -> str:
    text = vr.decode("latin-1")
    return repr(text) if text.isprintable() else f"0x{vr.hex().upper()}"


def check_structure(data: bytes | memoryview, transfer_syntax: UID) -> None:
    """Raise DatasetError unless every element of the dataset fits in the bytes received."""
    if not data:
        raise DatasetError("the dataset is empty")
    walker = _Walker(data, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
    walker.dataset(0, len(data), depth=0, in_item=False)


def _stop_at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    # int's own comparison: pydicom's BaseTag.__ge__ is Python code, called for every element.
    return int.__ge__(tag, PIXEL_DATA)


class ReceivedHeader(Dataset):
    """A received dataset's header whose values are converted on first access, safely.

    pydicom converts an element's bytes only when it is first read: routing,
    the identity check or a path template may be the first to touch a value
    the walk could not vouch for. A conversion that fails raises DatasetError
    there, like any other parse failure, and never escapes as pydicom's own
    exception.
    """

    def __getitem__(self, key: Any) -> Any:
        try:
            return super().__getitem__(key)
        except PARSE_ERRORS as exc:
            if isinstance(exc, KeyError) and key not in self:
                raise  # absent, not unreadable: Dataset.get() turns this into its default
            raise DatasetError(f"a header value cannot be read: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def read_header(data: bytes | memoryview, transfer_syntax: UID) -> Dataset:
    """Parse the elements before Pixel Data: enough for routing, layout and checks.

    Raises DatasetError, now or when a value is first read from the result.
    """
    # BytesIO shares a bytes object without copying; anything else is copied,
    # but only up to HEADER_SPAN, so a multi-GB instance is not duplicated.
    head = (
        data if isinstance(data, bytes) and len(data) <= HEADER_SPAN else bytes(data[:HEADER_SPAN])
    )
    fp = DicomBytesIO(head)
    fp.is_little_endian = transfer_syntax.is_little_endian
    fp.is_implicit_VR = transfer_syntax.is_implicit_VR
    try:
        parsed = read_dataset(
            cast(BinaryIO, fp),  # annotated BinaryIO, written for pydicom's own DicomIO
            transfer_syntax.is_implicit_VR,
            transfer_syntax.is_little_endian,
            stop_when=_stop_at_pixel_data,
            defer_size=4096,
        )
    except PARSE_ERRORS as exc:
        raise DatasetError(f"the dataset cannot be parsed: {_describe(exc)}") from None
    header = ReceivedHeader(parsed)
    header.set_original_encoding(
        transfer_syntax.is_implicit_VR,
        transfer_syntax.is_little_endian,
        parsed.original_character_set,
    )
    # Values over defer_size are read from the buffer when first accessed.
    header.filename = None
    header.buffer = fp
    header.timestamp = None
    header.fileobj_type = DicomBytesIO
    return header


def decode_received(
    data: bytes | memoryview, transfer_syntax: UID, max_size: int = 0
) -> tuple[bytes | memoryview, UID]:
    """The bytes to walk and parse: inflated for the deflated syntax, else as received.

    max_size (limits.max_instance_size; 0 for none) also bounds the inflated size.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return inflate(data, max_size or DEFAULT_INFLATE_LIMIT), transfer_syntax
    return data, transfer_syntax
