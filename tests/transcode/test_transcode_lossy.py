"""Lossy round trips: opt-in only, every lossy attribute set, error bounds kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from node.transcode import parse_target, transcode_file
from node.transcode.verify import max_abs_error
from tests.corpus import find
from tests.transcode_support import our_decode, source_pixels

_METHODS = {
    "JPEGLSNearLossless": "ISO_14495_1",
    "JPEG2000": "ISO_15444_1",
    "HTJ2K": "ISO_15444_15",
    "JPEGBaseline8Bit": "ISO_10918_1",
}


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ({"syntax": "JPEGLSNearLossless", "near": 3}, "MR2_UNCR.dcm"),
        ({"syntax": "JPEG2000", "ratio": 10}, "MR2_UNCR.dcm"),
        ({"syntax": "JPEG2000", "psnr": 45}, "US1_UNCR.dcm"),
        ({"syntax": "HTJ2K", "ratio": 8}, "RG1_UNCR.dcm"),
        ({"syntax": "JPEGBaseline8Bit", "quality": 85}, "US1_UNCR.dcm"),
    ],
)
def test_lossy_attributes(spec: dict, name: str, tmp_path: Path) -> None:
    src, dst = find(name), tmp_path / "out.dcm"
    target = parse_target(spec)
    assert target.lossy
    outcome = transcode_file(src, dst, [target], allow_lossy=True)
    assert not outcome.fallback, outcome.reasons
    source, written = dcmread(src), dcmread(dst)
    assert written.LossyImageCompression == "01"
    methods = written.LossyImageCompressionMethod
    assert (methods if isinstance(methods, str) else methods[-1]) == _METHODS[spec["syntax"]]
    assert float(written.LossyImageCompressionRatio) > 1
    assert written.ImageType[0] == "DERIVED"
    assert written.SOPInstanceUID != source.SOPInstanceUID
    assert written.file_meta.MediaStorageSOPInstanceUID == written.SOPInstanceUID
    assert outcome.sop_instance_uid == written.SOPInstanceUID
    assert our_decode(dst).array.shape == source_pixels(src).array.shape


def test_near_lossless_error_is_bounded(tmp_path: Path) -> None:
    src, dst = find("CT_small.dcm"), tmp_path / "out.dcm"  # unsigned would be MR2; CT is signed
    src = find("MR2_UNCR.dcm")
    transcode_file(
        src, dst, [parse_target({"syntax": "JPEGLSNearLossless", "near": 2})], allow_lossy=True
    )
    error = max_abs_error(our_decode(dst).array, source_pixels(src).array)
    assert 0 < error <= 2


def test_lossy_needs_opt_in(tmp_path: Path) -> None:
    src, dst = find("MR2_UNCR.dcm"), tmp_path / "out.dcm"
    outcome = transcode_file(src, dst, [parse_target("JPEG2000")])
    assert outcome.fallback
    assert "not allowed" in outcome.reasons[0]
    assert dst.read_bytes() == src.read_bytes()


def test_second_lossy_step_appends_ratio_and_method(tmp_path: Path) -> None:
    first, second = tmp_path / "a.dcm", tmp_path / "b.dcm"
    transcode_file(
        find("MR2_UNCR.dcm"), first, [parse_target("JPEGLSNearLossless")], allow_lossy=True
    )
    transcode_file(first, second, [parse_target("HTJ2K")], allow_lossy=True)
    written = dcmread(second)
    assert list(written.LossyImageCompressionMethod) == ["ISO_14495_1", "ISO_15444_15"]
    assert len(written.LossyImageCompressionRatio) == 2


@pytest.mark.parametrize(
    "name", ["JPEGLSNearLossless_16.dcm", "US1_J2KI.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
)
def test_lossy_mark_survives_decompression(name: str, tmp_path: Path) -> None:
    # JPEG-lossy.dcm itself cannot be decoded by the installed decoders (it falls back
    # as received), so these are the lossy sources we can decompress.
    src, dst = find(name), tmp_path / "out.dcm"
    outcome = transcode_file(src, dst, [parse_target("ExplicitVRLittleEndian")])
    assert not outcome.fallback, outcome.reasons
    written = dcmread(dst)
    assert written.LossyImageCompression == "01"
    assert written.SOPInstanceUID == dcmread(src).SOPInstanceUID  # decompression is lossless


def test_undecodable_lossy_source_is_kept_as_received(tmp_path: Path) -> None:
    src, dst = find("JPEG-lossy.dcm"), tmp_path / "out.dcm"
    outcome = transcode_file(src, dst, [parse_target("ExplicitVRLittleEndian")])
    assert outcome.fallback
    assert "cannot be decoded" in outcome.reasons[0]
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    "spec",
    [
        "NoSuchSyntax",
        "ExplicitVRBigEndian",
        {"syntax": "JPEGLSLossless", "near": 1},
        {"syntax": "JPEGLSNearLossless", "near": 0},
        {"near": 2},
        {"syntax": "JPEG2000", "ratio": 5, "psnr": 40},
    ],
)
def test_parse_target_rejects_with_message(spec: object) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        parse_target(spec)  # type: ignore[arg-type]
