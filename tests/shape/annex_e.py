"""PS3.15 Annex E Table E.1-1 from a source independent of the node's: innolitics'
dicom-standard JSON (the `dicom-standard` test dependency installs it under the
environment's prefix, `standard/confidentiality_profile_attributes.json`).

That copy is of an older edition (2020) than the table the node applies (dicom-anonymizer's
newest); an attribute it lists is listed in every later edition, so what it says to
remove or replace must be removed or replaced in the node's output.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

TABLE = Path(sys.prefix) / "standard" / "confidentiality_profile_attributes.json"


@dataclass(frozen=True)
class AnnexE:
    actions: dict[int, str]  # tag -> Basic Profile action
    curves: str  # (50xx,xxxx)
    overlay_data: str  # (60xx,3000)
    overlay_comments: str  # (60xx,4000)
    private: str  # (gggg,eeee) with gggg odd

    def action_for(self, tag: int) -> str | None:
        group, element = tag >> 16, tag & 0xFFFF
        if group % 2:
            return self.private
        if group & 0xFF00 == 0x5000:
            return self.curves
        if group & 0xFF00 == 0x6000 and element in (0x3000, 0x4000):
            return self.overlay_data if element == 0x3000 else self.overlay_comments
        return self.actions.get(tag)


@functools.cache
def annex_e() -> AnnexE:
    rows = json.loads(TABLE.read_text())
    actions: dict[int, str] = {}
    patterns: dict[str, str] = {}
    for row in rows:
        ident = row["id"].lower()
        try:
            actions[int(ident, 16)] = row["basicProfile"]
        except ValueError:
            patterns[ident if "gggg" not in row["tag"].lower() else "private"] = row["basicProfile"]
    return AnnexE(
        actions,
        curves=patterns["50xxxxxx"],
        overlay_data=patterns["60xx3000"],
        overlay_comments=patterns["60xx4000"],
        private=patterns["private"],
    )


def leaves(ds: Dataset, path: tuple[int, ...] = ()) -> Iterator[tuple[tuple[int, ...], int, str]]:
    """(sequence path, tag, value as text) for every element that is not a sequence."""
    for element in ds:
        tag = int(element.tag)
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                yield from leaves(item, (*path, tag, index))
        elif tag != 0x7FE00010:
            yield path, tag, _text(element.value)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)  # type: ignore[attr-defined]
    return "" if value is None else str(value)
