"""Value templates: `A-{PatientID}` over the instance's own keywords and its association.

A substituted value is sanitised as the storage layout sanitises path segments: control
characters and the value delimiter (backslash) become `_`, and outer spaces go, so
nothing a sender puts in a tag can add values or break the element. The literal text of
a template is the administrator's and is kept as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

ASSOCIATION_FIELDS = ("CallingAETitle", "CalledAETitle")

_FIELD = re.compile(r"\{([^{}]*)\}")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]")


class TemplateError(ValueError):
    """A template that cannot be used (unknown keyword, unbalanced braces)."""


@dataclass(frozen=True)
class Template:
    text: str
    fields: tuple[str, ...]

    def render(self, ds: Dataset, association: Mapping[str, str]) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            raw = association.get(name, "") if name in ASSOCIATION_FIELDS else _text(ds, name)
            return sanitise_value(raw)

        return _FIELD.sub(value, self.text)


def parse_template(text: str) -> Template:
    if text.count("{") != text.count("}") or _FIELD.sub("", text).count("{"):
        raise TemplateError(f"unbalanced braces in {text!r}")
    fields = tuple(dict.fromkeys(_FIELD.findall(text)))
    for name in fields:
        if name not in ASSOCIATION_FIELDS and tag_for_keyword(name) is None:
            raise TemplateError(
                f"{{{name}}} is not a DICOM keyword (e.g. PatientID) nor one of"
                f" {', '.join(ASSOCIATION_FIELDS)}"
            )
    return Template(text, fields)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or isinstance(value, Sequence | bytes):
        return ""
    if isinstance(value, MultiValue):
        return "_".join(str(item) for item in value)
    return str(value)


def sanitise_value(value: str) -> str:
    return _UNSAFE.sub("_", value).strip()
