"""De-identified copies over a corpus subset, checked against an independent Annex E table.

Each copy is made by the one encode path (node.transcode.transcode_file with the
target's Shaping), as storage, forwarding and `dicom-node transcode` make it. Checked:
- nothing that Table E.1-1 (innolitics' copy, tests/shape/annex_e.py) says to remove
  or replace keeps its original value, at any depth; no private attribute is left;
- UIDs are the keyed map of the originals, wherever they are (references too);
- Pixel Data bytes are identical in the same syntax; decoded pixels are identical
  when the copy is also transcoded;
- DCMTK's element view differs only in attributes the profile names;
- dciodvfy finds no new errors.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.shape import ShapeContext, Shaping, ShapingFailed, ShapingRefused
from node.shape.deidentify import Deidentification, dummy_value
from node.shape.profile import basic_profile_table
from node.shape.uidmap import UidMap
from node.transcode import parse_target, transcode_file
from node.transcode.pixels import decode_pixels, same_pixels
from tests.corpus import find
from tests.dcmtk_view import dcmtk_view
from tests.shape.annex_e import annex_e, leaves
from tests.shape.views import changed_elements
from tests.tools import require_tool

SECRET = b"test key for the corpus, 32 byte"
SHAPING = Shaping(deidentification=Deidentification(options=(), keep=(), secret=SECRET))

# One of each kind the profile must handle: syntaxes (big endian, implicit, RLE, JPEG-LS,
# JPEG 2000, deflated), multi-frame, overlays, waveforms, RT, SR content, SEG references.
SAME_SYNTAX = [
    "CT_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR2_J2KR.dcm",
    "emri_small_big_endian.dcm",
    "examples_overlay.dcm",
    "liver_expb_1frame.dcm",
    "rtplan.dcm",
    "rtdose_expb_1frame.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "693_UNCR.dcm",
]
TRANSCODED = [
    ("CT_small.dcm", "JPEGLSLossless"),
    ("MR_small_RLE.dcm", "ExplicitVRLittleEndian"),
    ("emri_small_big_endian.dcm", "RLELossless"),
]
REFUSED = ["US1_UNCR.dcm", "image_dfl.dcm", "SC_rgb.dcm"]  # US/OT, no Burned In Annotation

ADDED = {0x00120062, 0x00120063, 0x00120064, 0x00280303}


@dataclass(frozen=True)
class Copy:
    name: str
    syntax: str  # "" for the source's own
    source: Path
    output: Path


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> list[Copy]:
    folder = tmp_path_factory.mktemp("deidentified")
    made = []
    jobs = [(name, "") for name in SAME_SYNTAX] + TRANSCODED
    for index, (name, syntax) in enumerate(jobs):
        source, output = find(name), folder / f"{index}-{name}"
        ladder = [parse_target(syntax)] if syntax else []
        outcome = transcode_file(source, output, ladder, shaping=SHAPING, context=ShapeContext())
        assert not outcome.fallback, (name, outcome.reasons)
        made.append(Copy(name, syntax, source, output))
    return made


def _ids(copies: list[Copy]) -> list[str]:
    return [f"{c.name}->{c.syntax or 'same'}" for c in copies]


def test_nothing_annex_e_removes_or_replaces_keeps_its_original_value(copies: list[Copy]) -> None:
    table = annex_e()
    problems = []
    checked = 0
    for copy in copies:
        written = {(tag, value) for _path, tag, value in leaves(dcmread(copy.output))}
        for _path, tag, value in leaves(dcmread(copy.source)):
            action = table.action_for(tag)
            if action is None or action == "K" or not value.strip("\x00 "):
                continue
            checked += 1
            if tag >> 16 & 1:
                if any(t == tag for t, _v in written):
                    problems.append(f"{copy.name}: private {tag:08x} left")
                continue
            if (tag, value) in written and value not in _dummies():
                problems.append(f"{copy.name}: ({tag >> 16:04x},{tag & 0xFFFF:04x}) {action} kept")
    assert checked > 300, "the corpus subset must exercise the table"
    assert problems == []


def _dummies() -> set[str]:
    return {str(dummy_value(vr)) for vr in ("DA", "DT", "TM", "LO", "DS", "AS", "US", "UR")}


def test_no_private_attribute_is_left_at_any_depth(copies: list[Copy]) -> None:
    left = [
        (c.name, f"{tag:08x}")
        for c in copies
        for _path, tag, _v in leaves(dcmread(c.output))
        if tag >> 16 & 1
    ]
    assert left == []
    assert any(tag >> 16 & 1 for c in copies for _p, tag, _v in leaves(dcmread(c.source))), (
        "the subset must have private attributes to remove"
    )


def test_every_uid_is_the_keyed_map_of_the_original_where_it_was(copies: list[Copy]) -> None:
    uids = UidMap(SECRET)
    table = annex_e()
    remapped = 0
    for copy in copies:
        written = {(path, tag): value for path, tag, value in leaves(dcmread(copy.output))}
        for path, tag, value in leaves(dcmread(copy.source)):
            if table.action_for(tag) != "U" or not value:
                continue
            if (path, tag) not in written:
                continue  # in a sequence the profile removed or emptied (X/Z)
            expected = "\\".join(uids.remap(v) for v in value.split("\\"))
            assert written[(path, tag)] == expected, (copy.name, path, f"{tag:08x}")
            remapped += 1
        meta = dcmread(copy.output).file_meta
        assert meta.MediaStorageSOPInstanceUID == dcmread(copy.output).SOPInstanceUID
    assert remapped > 30


def test_references_inside_sequences_follow_the_instances_they_name(tmp_path: Path) -> None:
    # Two instances of one series made by separate runs (as two associations, or a
    # restart, would): the reference in one is the new SOP Instance UID of the other.
    first, second = _instance_pair(tmp_path)
    out_first, out_second = tmp_path / "a-out.dcm", tmp_path / "b-out.dcm"
    transcode_file(first, out_first, [], shaping=SHAPING)
    transcode_file(second, out_second, [], shaping=_fresh_shaping())
    a, b = dcmread(out_first), dcmread(out_second)
    assert a.StudyInstanceUID == b.StudyInstanceUID != dcmread(first).StudyInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    other_key = Shaping(deidentification=Deidentification((), (), b"another key, 16+ bytes"))
    transcode_file(second, tmp_path / "c-out.dcm", [], shaping=other_key)
    assert dcmread(tmp_path / "c-out.dcm").StudyInstanceUID != b.StudyInstanceUID


def _fresh_shaping() -> Shaping:
    return Shaping(deidentification=Deidentification(options=(), keep=(), secret=bytes(SECRET)))


def _instance_pair(folder: Path) -> tuple[Path, Path]:
    ds = dcmread(find("CT_small.dcm"))
    first = folder / "a.dcm"
    ds.save_as(first, enforce_file_format=True)
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = ds.SOPClassUID
    referenced.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".2"
    ds.ReferencedImageSequence = [referenced]
    second = folder / "b.dcm"
    ds.save_as(second, enforce_file_format=True)
    return first, second


def test_pixel_data_bytes_are_identical_in_the_same_syntax(copies: list[Copy]) -> None:
    same = [c for c in copies if not c.syntax]
    for copy in same:
        source, output = dcmread(copy.source), dcmread(copy.output)
        assert output.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in source:
                assert output[keyword].value == source[keyword].value, copy.name
    assert sum("PixelData" in dcmread(c.source) for c in same) >= 10


def test_decoded_pixels_are_identical_when_the_copy_is_transcoded(copies: list[Copy]) -> None:
    for copy in [c for c in copies if c.syntax]:
        output = dcmread(copy.output)
        assert output.file_meta.TransferSyntaxUID == parse_target(copy.syntax).transfer_syntax
        source_pixels = decode_pixels(dcmread(copy.source)).array
        assert same_pixels(decode_pixels(output).array, source_pixels), copy.name
        assert np.asarray(source_pixels).size > 0


def test_dcmtk_sees_only_attributes_the_profile_names_change(
    copies: list[Copy], tmp_path: Path
) -> None:
    require_tool("dcmdump")
    named = set(basic_profile_table().actions) | set(annex_e().actions) | ADDED
    unexpected = []
    for index, copy in enumerate(copies):
        before = dcmtk_view(copy.source, tmp_path / f"{index}-in")
        after = dcmtk_view(copy.output, tmp_path / f"{index}-out")
        assert before.lines and after.lines, (copy.name, before.problems, after.problems)
        for chain, line in changed_elements(before, after):
            if not any(_named(tag, named) for tag in chain):
                unexpected.append(f"{copy.name}: {line[:140]}")
    assert unexpected == [], "\n".join(unexpected)


def _named(tag: int, named: set[int]) -> bool:
    """An attribute the profile acts on: in the table, private, curves and overlays."""
    return tag in named or bool(tag >> 16 & 1) or tag >> 24 in (0x50, 0x60)


def _dciodvfy_errors(path: Path) -> set[str]:
    done = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
    lines = (done.stdout + done.stderr).splitlines()
    # The findings name values, and a remapped UID is a new value for the same finding.
    errors = {line for line in lines if line.startswith("Error")}
    return {re.sub(r"\s+", " ", re.sub(r"<[0-9.]+>", "<UID>", line)) for line in errors}


def test_dciodvfy_finds_no_new_errors(copies: list[Copy]) -> None:
    require_tool("dciodvfy")
    new = {
        f"{copy.name}->{copy.syntax or 'same'}": _dciodvfy_errors(copy.output)
        - _dciodvfy_errors(copy.source)
        for copy in copies
    }
    found = {name: errors for name, errors in new.items() if errors}
    assert found == {}, "\n".join(f"{n}: {e}" for n, es in found.items() for e in es)


@pytest.mark.parametrize("name", REFUSED)
def test_an_instance_that_may_burn_text_in_is_refused_and_nothing_written(
    name: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.dcm"
    with pytest.raises(ShapingRefused, match="Burned In Annotation is missing"):
        transcode_file(find(name), out, [], shaping=SHAPING)
    assert not out.exists()


def test_burned_in_annotation_yes_is_refused_whatever_the_modality(tmp_path: Path) -> None:
    ds = dcmread(find("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "burned.dcm", enforce_file_format=True)
    with pytest.raises(ShapingRefused, match="Burned In Annotation is YES"):
        transcode_file(tmp_path / "burned.dcm", tmp_path / "out.dcm", [], shaping=SHAPING)
    assert not (tmp_path / "out.dcm").exists()


def test_the_profile_is_marked_in_the_copy(copies: list[Copy]) -> None:
    ds = dcmread(copies[0].output)
    assert ds.PatientIdentityRemoved == "YES"
    assert [item.CodeValue for item in ds.DeidentificationMethodCodeSequence] == ["113100"]
    assert ds.DeidentificationMethodCodeSequence[0].CodingSchemeDesignator == "DCM"
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_a_source_that_cannot_be_shaped_is_never_written_as_received(tmp_path: Path) -> None:
    # Every rung fails for a truncated source; a target without a shaping would get the
    # instance as received (the ladder's last resort), a de-identifying one never.
    out = tmp_path / "out.dcm"
    with pytest.raises(ShapingFailed, match="source truncated"):
        transcode_file(find("rtplan_truncated.dcm"), out, [], shaping=SHAPING)
    assert not out.exists()
    assert transcode_file(find("rtplan_truncated.dcm"), out, []).fallback is False
    assert out.read_bytes() == find("rtplan_truncated.dcm").read_bytes()
