"""Coercion: `set` from templates and `delete`, for one target's copy, element by element.

A coerced copy is made by the one encode path and compared with its source in DCMTK's
element view (tests/dcmtk_view.py): only the named attributes may differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from node.shape import ShapeContext, Shaping, ShapingFailed
from node.shape.coerce import parse_coercion
from node.transcode import parse_target, transcode_file
from node.transcode.pixels import decode_pixels, same_pixels
from tests.corpus import find
from tests.dcmtk_view import dcmtk_view
from tests.shape.views import changed_elements
from tests.tools import require_tool

SET = {
    "PatientID": "A-{PatientID}",
    "IssuerOfPatientID": "SITE-A",
    "InstitutionName": "Site A Hospital",
    "StationName": "{CalledAETitle}",
    "StudyDescription": "{StudyDescription} from {CallingAETitle}",
}
DELETE = ["OtherPatientIDs", "OtherPatientIDsSequence", "(0009,xx30)", "(0011,xxxx)@GEMS_PATI_01"]
CONTEXT = ShapeContext(calling_ae_title="MODALITY1", called_ae_title="NODE-A")
NAMED = {
    "(0010,0020)", "(0010,0021)", "(0008,0080)", "(0008,1010)", "(0008,1030)",
    "(0010,1000)", "(0010,1002)",
}  # fmt: skip


def _coerce(src: Path, dst: Path, syntax: str = "", **kwargs: object) -> None:
    shaping = Shaping(coercion=parse_coercion(SET, DELETE))
    ladder = [parse_target(syntax)] if syntax else []
    outcome = transcode_file(src, dst, ladder, shaping=shaping, context=CONTEXT)
    assert not outcome.fallback, outcome.reasons


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("CT_small.dcm", ""),
        ("MR_small_bigendian.dcm", ""),
        ("MR_small_RLE.dcm", ""),
        ("693_UNCR.dcm", ""),
        ("CT_small.dcm", "RLELossless"),
        ("MR_small_bigendian.dcm", "JPEGLSLossless"),
    ],
)
def test_a_coerced_copy_differs_from_its_source_only_in_the_named_attributes(
    name: str, syntax: str, tmp_path: Path
) -> None:
    require_tool("dcmdump")
    src, dst = find(name), tmp_path / "coerced.dcm"
    _coerce(src, dst, syntax)
    before, after = dcmtk_view(src, tmp_path / "in"), dcmtk_view(dst, tmp_path / "out")
    assert before.lines and after.lines
    changed = changed_elements(before, after)
    outside = [
        line
        for chain, line in changed
        if f"({chain[0] >> 16:04x},{chain[0] & 0xFFFF:04x})" not in NAMED
        and chain[0] >> 16 not in (0x0009, 0x0011)
    ]
    assert outside == []
    assert 0x00100020 in {chain[0] for chain, _line in changed}
    source, written = dcmread(src), dcmread(dst)
    assert written.PatientID == f"A-{source.PatientID}"
    assert written.IssuerOfPatientID == "SITE-A"
    assert written.StationName == "NODE-A"
    assert written.StudyDescription == f"{source.get('StudyDescription', '')} from MODALITY1"
    assert written.SOPInstanceUID == source.SOPInstanceUID  # coercion is not de-identification
    if syntax:
        assert same_pixels(decode_pixels(written).array, decode_pixels(source).array)
    else:
        assert written.PixelData == source.PixelData


def test_delete_takes_keywords_tags_and_private_tags_by_creator_block(tmp_path: Path) -> None:
    src = find("CT_small.dcm")  # GE: private groups 0009, 0011, 0019, ... with creators
    source = dcmread(src)
    assert str(source[0x00110010].value) == "GEMS_PATI_01"
    assert "OtherPatientIDsSequence" in source
    dst = tmp_path / "out.dcm"
    _coerce(src, dst)
    written = dcmread(dst)
    assert "OtherPatientIDsSequence" not in written
    assert not [t for t in _tags(written) if t.group == 0x0011]  # whole block, creator too
    gone = [t for t in _tags(source) if t.group == 0x0009 and t.element & 0xFF == 0x30]
    assert gone and not [t for t in gone if t in written]
    kept = [t for t in _tags(source) if t.group == 0x0009 and t.element & 0xFF != 0x30]
    assert kept and all(written[t].value == source[t].value for t in kept)
    assert [t for t in _tags(source) if t.group == 0x0019] == [
        t for t in _tags(written) if t.group == 0x0019
    ]


def test_a_creator_block_selector_leaves_other_creators_blocks(tmp_path: Path) -> None:
    src = find("CT_small.dcm")
    shaping = Shaping(coercion=parse_coercion({}, ["(0009,xx30)@NO SUCH CREATOR"]))
    transcode_file(src, tmp_path / "out.dcm", [], shaping=shaping)
    source, written = dcmread(src), dcmread(tmp_path / "out.dcm")
    assert [t for t in _tags(source) if t.group == 0x0009] == [
        t for t in _tags(written) if t.group == 0x0009
    ]


def test_substituted_values_are_sanitised_like_the_layout(tmp_path: Path) -> None:
    ds = dcmread(find("CT_small.dcm"))
    ds.PatientID = "12\\34\x07"  # a second value and a control character from the sender
    ds.save_as(tmp_path / "in.dcm", enforce_file_format=True)
    shaping = Shaping(coercion=parse_coercion({"PatientID": "A-{PatientID}"}, []))
    transcode_file(tmp_path / "in.dcm", tmp_path / "out.dcm", [], shaping=shaping)
    assert dcmread(tmp_path / "out.dcm").PatientID == "A-12_34_"


def test_a_value_the_vr_cannot_hold_is_refused_not_truncated(tmp_path: Path) -> None:
    ds = dcmread(find("CT_small.dcm"))
    ds.PatientID = "P" * 64
    ds.save_as(tmp_path / "in.dcm", enforce_file_format=True)
    shaping = Shaping(coercion=parse_coercion({"PatientID": "SITE-A-{PatientID}"}, []))
    with pytest.raises(ShapingFailed, match="PatientID would be 71 characters; LO holds at most"):
        transcode_file(tmp_path / "in.dcm", tmp_path / "out.dcm", [], shaping=shaping)
    assert not (tmp_path / "out.dcm").exists()


def test_templates_see_the_instance_as_it_came_whatever_the_order(tmp_path: Path) -> None:
    source = dcmread(find("CT_small.dcm"))
    shaping = Shaping(
        coercion=parse_coercion(
            {"OtherPatientIDs": "{PatientID}", "PatientID": "A-{PatientID}"}, []
        )
    )
    transcode_file(find("CT_small.dcm"), tmp_path / "out.dcm", [], shaping=shaping)
    written = dcmread(tmp_path / "out.dcm")
    assert written.PatientID == f"A-{source.PatientID}"
    assert written.OtherPatientIDs == source.PatientID


def _tags(ds: Dataset) -> list[BaseTag]:
    # Not `for element in ds`: that reads every value; pydicom's keys() are the tags.
    return list(ds.keys())
