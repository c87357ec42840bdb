"""Attribute coercion: set attributes from templates, delete others, for one target's copy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from node.shape.errors import ShapingFailed
from node.shape.selectors import Selector, parse_selector
from node.shape.template import Template, TemplateError, parse_template

# PS3.5 Table 6.2-1: the longest value each text VR holds (characters; PN per group).
MAX_LENGTH = {
    "AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64,
    "LT": 10240, "PN": 64 * 3 + 2, "SH": 16, "ST": 1024, "TM": 14, "UI": 64,
}  # fmt: skip
UNLIMITED_TEXT = frozenset({"UC", "UR", "UT"})
SINGLE_VALUED_TEXT = frozenset({"LT", "ST", "UT", "UR"})
INTEGER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
FLOAT_VRS = frozenset({"FL", "FD"})


class CoercionError(ValueError):
    """A `set` or `delete` entry that cannot be used; config errors name its key."""


@dataclass(frozen=True)
class Assignment:
    keyword: str
    tag: int
    vr: str
    template: Template


@dataclass(frozen=True)
class Coercion:
    """`set` and `delete` of one target, parsed and checked."""

    assignments: tuple[Assignment, ...] = ()
    deletions: tuple[Selector, ...] = ()

    def describe(self) -> str:
        parts = []
        if self.assignments:
            parts.append("set " + ", ".join(a.keyword for a in self.assignments))
        if self.deletions:
            parts.append("delete " + ", ".join(s.text for s in self.deletions))
        return "coerce " + "; ".join(parts) if parts else ""

    def apply(self, ds: Dataset, association: Mapping[str, str]) -> None:
        # Every template sees the instance as it came to this step, whatever the order of
        # `set`: PatientID = "A-{PatientID}" prefixes once, never twice.
        values = [(a, a.template.render(ds, association)) for a in self.assignments]
        for selector in self.deletions:
            for tag in list(selector.tags_in(ds)):
                del ds[tag]
        for assignment, text in values:
            ds.add_new(assignment.tag, assignment.vr, typed_value(assignment, text))


def parse_assignment(keyword: str, text: str) -> Assignment:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise CoercionError(f"{keyword!r} is not a DICOM keyword (e.g. InstitutionName)")
    vr = dictionary_VR(tag)
    if vr not in MAX_LENGTH and vr not in UNLIMITED_TEXT | INTEGER_VRS | FLOAT_VRS:
        raise CoercionError(f"{keyword} has VR {vr}, which a template cannot set")
    try:
        template = parse_template(text)
    except TemplateError as error:
        raise CoercionError(str(error)) from None
    return Assignment(keyword, int(tag), vr, template)


def parse_coercion(assignments: Mapping[str, str], deletions: Sequence[str]) -> Coercion:
    return Coercion(
        tuple(parse_assignment(keyword, text) for keyword, text in assignments.items()),
        tuple(parse_selector(text) for text in deletions),
    )


def typed_value(assignment: Assignment, text: str) -> object:
    """The element value for text in the attribute's VR; ShapingFailed when it cannot hold it."""
    vr = assignment.vr
    parts = [text] if vr in SINGLE_VALUED_TEXT else text.split("\\")
    if vr in INTEGER_VRS | FLOAT_VRS:
        try:
            numbers = [int(p) if vr in INTEGER_VRS else float(p) for p in parts if p]
        except ValueError:
            raise ShapingFailed(f"coerced {assignment.keyword} {text!r} is not a number") from None
        return numbers[0] if len(numbers) == 1 else numbers
    limit = MAX_LENGTH.get(vr)
    for part in parts:
        if limit is not None and len(part) > limit:
            # Cut short, two patients' IDs could become one: refused rather than truncated.
            raise ShapingFailed(
                f"coerced {assignment.keyword} would be {len(part)} characters;"
                f" {vr} holds at most {limit}"
            )
    return parts[0] if len(parts) == 1 else parts
