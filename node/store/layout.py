"""Path templates: where an instance lands under a storage root, from its own keywords.

Every value is sanitised, so nothing a sender puts in a tag can lead a file
outside the storage root. Config parsing checks templates with parse_layout, so
this module imports nothing of the node's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

PLACEHOLDER = "UNKNOWN"
MAX_COMPONENT_LENGTH = 64

_FIELD = re.compile(r"\{([^{}]*)\}")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


class LayoutError(ValueError):
    """A path template that cannot be used."""


@dataclass(frozen=True)
class Layout:
    """A parsed path template such as '{PatientID}/{StudyInstanceUID}/{SOPInstanceUID}.dcm'."""

    template: str
    keywords: tuple[str, ...]

    def render(self, header: Dataset) -> Path:
        return self.render_values(header_texts(header, self.keywords))

    def render_values(self, texts: Mapping[str, str]) -> Path:
        """The path from each keyword's text as header_texts gives it (raises KeyError if one
        is missing): what intake recorded, so the store worker need not parse the file again."""
        values = {keyword: sanitise_component(texts[keyword]) for keyword in self.keywords}
        # Values are already safe and literal segments were checked by parse_layout,
        # so a segment can be neither empty nor '..'.
        return Path(
            *[_FIELD.sub(lambda m: values[m.group(1)], part) for part in self.template.split("/")]
        )


def header_texts(header: Dataset, keywords: tuple[str, ...]) -> dict[str, str]:
    """Each keyword's value as the layout reads it, before sanitising."""
    return {keyword: _keyword_text(header, keyword) for keyword in keywords}


def parse_layout(template: str) -> Layout:
    """Check a layout template: every {field} must be a DICOM keyword."""
    if not template or template.startswith("/"):
        raise LayoutError(f"must be a relative path template, got {template!r}")
    if template.count("{") != template.count("}"):
        raise LayoutError(f"unbalanced braces in {template!r}")
    keywords = tuple(dict.fromkeys(_FIELD.findall(template)))
    for keyword in keywords:
        if tag_for_keyword(keyword) is None:
            raise LayoutError(f"{{{keyword}}} is not a DICOM keyword (e.g. PatientID, StudyDate)")
    for part in template.split("/"):
        if part in ("", ".", "..") or "\\" in part:
            raise LayoutError(f"empty, '.' or '..' path segment in {template!r}")
    return Layout(template=template, keywords=keywords)


def _keyword_text(header: Dataset, keyword: str) -> str:
    value = header.get(keyword)
    if value is None or isinstance(value, Sequence | bytes):
        return ""
    if isinstance(value, MultiValue):
        return "_".join(str(item) for item in value)
    return str(value)


def sanitise_component(value: str) -> str:
    """Make one path segment safe: no separators, controls, '..', bounded length."""
    cleaned = _UNSAFE.sub("_", value).strip().strip(".")
    cleaned = cleaned.encode("utf-8")[:MAX_COMPONENT_LENGTH].decode("utf-8", "ignore")
    return cleaned or PLACEHOLDER
