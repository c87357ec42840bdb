"""Naming attributes in a config: a keyword, a tag, or a private tag by its creator's block.

`PatientID`, `(0010,0020)`, `(0009,xx10)` (element 10 of every private block in group
0009), `(0029,xx10)@SIEMENS CSA HEADER` (only in the block that creator reserved) and
`(0029,xxxx)@SIEMENS CSA HEADER` (the whole block, with its creator element).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

_TAG = re.compile(r"^\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)$")
_PRIVATE = re.compile(r"^\(([0-9A-Fa-f]{4}),[xX]{2}([0-9A-Fa-f]{2}|[xX]{2})\)(?:@(.+))?$")


class SelectorError(ValueError):
    """An attribute name that is neither a keyword, a tag nor a private tag."""


@dataclass(frozen=True)
class Selector:
    """One attribute, or private elements by group, element offset and creator."""

    text: str
    tag: int | None = None  # a public attribute or an exact private tag
    group: int = 0  # private: the odd group
    offset: int | None = None  # private: the low byte of the element; None = the whole block
    creator: str | None = None  # private: only blocks reserved by this creator

    def tags_in(self, ds: Dataset) -> Iterator[BaseTag]:
        """The tags of ds (top level) that this selector names."""
        if self.tag is not None:
            if self.tag in ds:
                yield Tag(self.tag)
            return
        for tag in list(ds.keys()):
            if tag.group != self.group or tag.element < 0x10:
                continue
            block = tag.element >> 8 if tag.element >= 0x1000 else tag.element
            if self.creator is not None and _creator(ds, self.group, block) != self.creator:
                continue
            if tag.element < 0x1000:  # a creator element: only with its whole block
                if self.offset is None and self.creator is not None:
                    yield tag
                continue
            if self.offset is None or tag.element & 0xFF == self.offset:
                yield tag


def _creator(ds: Dataset, group: int, block: int) -> str | None:
    element = ds.get((group, block))
    return None if element is None else str(element.value).strip()


def parse_selector(text: str) -> Selector:
    keyword_tag = tag_for_keyword(text)
    if keyword_tag is not None:
        return Selector(text, tag=int(keyword_tag))
    exact = _TAG.match(text)
    if exact:
        return Selector(text, tag=int(exact.group(1), 16) << 16 | int(exact.group(2), 16))
    private = _PRIVATE.match(text)
    if private:
        group = int(private.group(1), 16)
        if group % 2 == 0:
            raise SelectorError(f"{text!r}: (gggg,xxee) names private tags, so gggg must be odd")
        offset = None if private.group(2).lower() == "xx" else int(private.group(2), 16)
        creator = private.group(3)
        if offset is None and creator is None:
            raise SelectorError(f"{text!r}: a whole private block needs its creator: @CREATOR")
        return Selector(text, group=group, offset=offset, creator=creator)
    raise SelectorError(
        f"{text!r} is not a DICOM keyword (e.g. OtherPatientIDs), a tag such as (0010,1000),"
        " or a private tag such as (0009,xx10) or (0029,xx10)@CREATOR"
    )
