"""PS3.15 Annex E Basic Application Level Confidentiality Profile, header only.

Every attribute of Table E.1-1 (node.shape.profile) gets its action, at every depth of
nesting; private attributes are removed; UIDs are remapped under the target's key
(node.shape.uidmap); Patient Identity Removed, De-identification Method and its Code
Sequence are added. Where the table offers a choice (X/Z, X/D, Z/D, X/Z/D, X/Z/U*), the
rightmost action is taken: it is the one the most demanding IOD asks for, so the output
stays as valid as the input without knowing each IOD's attribute types (see resolve()
for the one exception).

Pixels are never altered, so an instance that may show identity in them (Burned In
Annotation YES, or missing for US, SC and OT) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from node.shape.errors import ShapingRefused
from node.shape.options import BASIC_PROFILE, Option
from node.shape.profile import ProfileTable, basic_profile_table
from node.shape.selectors import Selector
from node.shape.uidmap import UidMap

MAY_BURN_IN_TEXT = frozenset({"US", "SC", "OT"})
OVERLAY_DATA = 0x3000

_DUMMY_TEXT = {
    "AS": "000Y", "DA": "19000101", "DT": "19000101000000", "TM": "000000", "DS": "0",
    "IS": "0", "UR": "urn:x-anonymous",
}  # fmt: skip
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT"})
_BYTES_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})


# Type 2 wherever it is used (Acquisition Context Module), so X/Z must empty it.
TYPE_2_SEQUENCES = frozenset({0x00400555})


def resolve(action: str, tag: int, is_sequence: bool) -> str:
    """The one action taken for a table entry: the rightmost of a choice, except that
    X/Z removes a sequence: a Type 3 sequence present must have items (Referenced Study
    Sequence in the General Study Module), and the only Type 2 one is listed."""
    if action == "X/Z" and is_sequence and tag not in TYPE_2_SEQUENCES:
        return "X"
    return action.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Deidentification:
    """One target's profile: its options, the attributes it keeps, and its UID key."""

    options: tuple[Option, ...]
    keep: tuple[Selector, ...]
    secret: bytes

    def describe(self) -> str:
        table = basic_profile_table()
        names = ", ".join(option.name for option in self.options)
        return f"PS3.15 Basic Profile ({table.edition})" + (f" with {names}" if names else "")

    def apply(self, ds: Dataset) -> None:
        refuse_burned_in_annotation(ds)
        kept = {int(tag) for selector in self.keep for tag in selector.tags_in(ds)}
        _Walk(basic_profile_table(), self.options, UidMap(self.secret), kept).dataset(ds, 0)
        mark_deidentified(ds, self.options)
        _update_file_meta(ds)


def refuse_burned_in_annotation(ds: Dataset) -> None:
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if burned == "YES":
        raise ShapingRefused(
            "refused for de-identification: Burned In Annotation is YES (pixels are never altered)"
        )
    if not burned and modality in MAY_BURN_IN_TEXT:
        raise ShapingRefused(
            f"refused for de-identification: Burned In Annotation is missing and"
            f" modality {modality} may burn text in (pixels are never altered)"
        )


class _Walk:
    def __init__(
        self, table: ProfileTable, options: tuple[Option, ...], uids: UidMap, kept: set[int]
    ) -> None:
        self.table = table
        self.options = options
        self.uids = uids
        self.kept = kept  # top-level tags the target's `keep` names

    def dataset(self, ds: Dataset, depth: int) -> None:
        for tag in list(ds.keys()):
            if depth == 0 and int(tag) in self.kept:
                continue
            if tag.is_private:
                del ds[tag]
                continue
            action = self.table.action_for(int(tag))
            if action is not None and any(o.keeps(int(tag), action) for o in self.options):
                continue
            if action is None:
                self._unlisted(ds, tag, depth)
            else:
                chosen = resolve(action, int(tag), _is_sequence(ds, tag))
                self._apply(ds, tag, chosen, depth)
        self._drop_overlays_without_data(ds)

    def _unlisted(self, ds: Dataset, tag: BaseTag, depth: int) -> None:
        # Kept, but a sequence may hold listed attributes (a UID in a code item, say).
        if _is_sequence(ds, tag):
            for item in ds[tag].value:
                self.dataset(item, depth + 1)

    def _apply(self, ds: Dataset, tag: BaseTag, action: str, depth: int) -> None:
        if action == "K":
            return
        if action == "X":
            del ds[tag]
            return
        element = ds[tag]
        if action == "Z":
            element.value = Sequence() if element.VR == "SQ" else None
        elif element.VR == "SQ":  # D or U*: the items stay, de-identified themselves
            for item in element.value:
                self.dataset(item, depth + 1)
        elif action == "U" or element.VR == "UI":
            self._remap(element)
        else:  # D
            element.value = dummy_value(element.VR)

    def _remap(self, element: DataElement) -> None:
        value = element.value
        if isinstance(value, list | tuple):
            element.value = [self.uids.remap(str(v)) for v in value]
        elif value:
            element.value = self.uids.remap(str(value))

    def _drop_overlays_without_data(self, ds: Dataset) -> None:
        # Overlay Data (60xx,3000) is X; an Overlay Plane without its data is not valid
        # (every attribute of the module is Type 1), so the rest of its group goes too.
        # Tags, not `for element in ds`, which would read every raw value.
        tags = list(ds.keys())
        groups = {t.group for t in tags if 0x6000 <= t.group <= 0x601E and t.group % 2 == 0}
        for group in groups:
            if (group << 16 | OVERLAY_DATA) not in ds:
                for tag in [t for t in tags if t.group == group]:
                    del ds[tag]


def _is_sequence(ds: Dataset, tag: BaseTag) -> bool:
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return False
    return vr == "SQ"


def dummy_value(vr: str) -> object:
    """A D value (PS3.15 E.1.1): non-empty, of the VR, identifying nobody."""
    if vr in _NUMBER_VRS:
        return 0
    if vr in _BYTES_VRS:
        return b"\x00\x00"
    return _DUMMY_TEXT.get(vr, "ANONYMOUS")


def mark_deidentified(ds: Dataset, options: tuple[Option, ...]) -> None:
    ds.PatientIdentityRemoved = "YES"
    methods = [(BASIC_PROFILE[0], BASIC_PROFILE[1])] + [
        (o.code_value, o.code_meaning) for o in options
    ]
    ds.DeidentificationMethod = [meaning for _code, meaning in methods]
    codes = Sequence()
    for code, meaning in methods:
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    dates_kept = any(o.name == "retain-longitudinal-dates" for o in options)
    ds.LongitudinalTemporalInformationModified = "UNMODIFIED" if dates_kept else "REMOVED"


def _update_file_meta(ds: Dataset) -> None:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    # The AE titles of whoever wrote or sent the file name a device and a site.
    for keyword in (
        "SourceApplicationEntityTitle",
        "SendingApplicationEntityTitle",
        "ReceivingApplicationEntityTitle",
    ):
        if keyword in meta:
            del meta[keyword]
