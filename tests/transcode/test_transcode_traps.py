"""Regression tests for the traps measured in README §2, and for codec crashes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom import uid as _uid

from node.transcode import TranscodePool, parse_target, transcode_file
from node.transcode.codecs import ABORT_ENV, overridden_encoder
from node.transcode.pixels import same_pixels
from tests.corpus import find
from tests.transcode_support import our_decode, source_pixels


def _exact(src: Path, dst: Path) -> None:
    expected = source_pixels(src)
    assert expected is not None
    assert same_pixels(our_decode(dst).array, expected.array)


@pytest.mark.parametrize("syntax", ["JPEGLSLossless", "RLELossless", "ExplicitVRLittleEndian"])
def test_big_endian_source_keeps_values(syntax: str, tmp_path: Path) -> None:
    src = find("MR_small_bigendian.dcm")
    outcome = transcode_file(src, tmp_path / "out.dcm", [parse_target(syntax)])
    assert not outcome.fallback
    decoded = our_decode(tmp_path / "out.dcm").array
    reference = our_decode(find("MR_small.dcm")).array  # the same image, little endian
    assert same_pixels(decoded, reference)
    assert int(decoded.flat[0]) == int(reference.flat[0])


@pytest.mark.parametrize("name", ["color-pl.dcm", "ExplVR_BigEnd.dcm"])
@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless", "ExplicitVRLittleEndian"])
def test_planar_configuration_1_sources(name: str, syntax: str, tmp_path: Path) -> None:
    src = find(name)
    dst = tmp_path / "out.dcm"
    outcome = transcode_file(src, dst, [parse_target(syntax)])
    assert not outcome.fallback, outcome.reasons
    _exact(src, dst)
    assert dcmread(dst).PlanarConfiguration == 0  # what we write is colour-by-pixel


def test_rgb_to_j2k_lossless_is_labelled_ybr_rct(tmp_path: Path) -> None:
    dst = tmp_path / "out.dcm"
    transcode_file(find("US1_UNCR.dcm"), dst, [parse_target("JPEG2000Lossless")])
    assert dcmread(dst).PhotometricInterpretation == "YBR_RCT"
    _exact(find("US1_UNCR.dcm"), dst)


def test_j2k_ybr_rct_decoded_to_native_is_rgb(tmp_path: Path) -> None:
    dst = tmp_path / "out.dcm"
    transcode_file(find("US1_J2KR.dcm"), dst, [parse_target("ExplicitVRLittleEndian")])
    assert dcmread(dst).PhotometricInterpretation == "RGB"


def test_jpeg_ybr_full_422_decoded_to_native_is_rgb(tmp_path: Path) -> None:
    dst = tmp_path / "out.dcm"
    outcome = transcode_file(find("examples_ybr_color.dcm"), dst, [parse_target("RLELossless")])
    assert not outcome.fallback
    assert dcmread(find("examples_ybr_color.dcm")).PhotometricInterpretation == "YBR_FULL_422"
    assert dcmread(dst).PhotometricInterpretation == "RGB"


def test_palette_colour_stays_palette(tmp_path: Path) -> None:
    dst = tmp_path / "out.dcm"
    outcome = transcode_file(
        find("OBXXXX1A_expb_2frame.dcm"), dst, [parse_target("JPEGLSLossless")]
    )
    assert not outcome.fallback
    written = dcmread(dst)
    assert written.PhotometricInterpretation == "PALETTE COLOR"
    assert "RedPaletteColorLookupTableData" in written


@pytest.mark.parametrize("name", ["SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm"])
@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless", "HTJ2KLossless"])
def test_odd_sizes(name: str, syntax: str, tmp_path: Path) -> None:
    dst = tmp_path / "out.dcm"
    outcome = transcode_file(find(name), dst, [parse_target(syntax)])
    assert not outcome.fallback, outcome.reasons
    _exact(find(name), dst)


def test_one_bit_segmentation_falls_back_with_one_reason(tmp_path: Path) -> None:
    src = find("liver_1frame.dcm")
    dst = tmp_path / "out.dcm"
    ladder = [parse_target("JPEGLSLossless"), parse_target("ExplicitVRLittleEndian")]
    outcome = transcode_file(src, dst, ladder)
    assert outcome.fallback
    assert outcome.reasons == ("JPEGLSLossless: 1-bit images unsupported",)
    assert outcome.transfer_syntax == _uid.ExplicitVRLittleEndian
    assert dcmread(dst).BitsAllocated == 1
    _exact(src, dst)


@pytest.mark.parametrize("name", ["rtdose_1frame.dcm", "SC_rgb_32bit.dcm"])
def test_32_bit_images_fall_back_to_as_received(name: str, tmp_path: Path) -> None:
    src = find(name)
    dst = tmp_path / "out.dcm"
    outcome = transcode_file(src, dst, [parse_target("JPEG2000Lossless")])
    assert outcome.fallback
    assert outcome.reasons == ("JPEG2000Lossless: 32-bit samples unsupported (max 16)",)
    assert dst.read_bytes() == src.read_bytes()


def test_32_bit_rle_is_exact(tmp_path: Path) -> None:
    dst = tmp_path / "out.dcm"
    outcome = transcode_file(find("rtdose_1frame.dcm"), dst, [parse_target("RLELossless")])
    assert not outcome.fallback
    _exact(find("rtdose_1frame.dcm"), dst)


def test_no_pixel_data_compressed_target_falls_to_native_rung(tmp_path: Path) -> None:
    src = find("rtplan.dcm")
    dst = tmp_path / "out.dcm"
    ladder = [parse_target("JPEGLSLossless"), parse_target("ImplicitVRLittleEndian")]
    outcome = transcode_file(src, dst, ladder)
    assert outcome.transfer_syntax == _uid.ImplicitVRLittleEndian
    assert outcome.reasons == ("JPEGLSLossless: no pixel data to compress",)
    assert dcmread(dst).SOPInstanceUID == dcmread(src).SOPInstanceUID


def test_mismatch_is_counted_logged_and_never_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from node.transcode import verification_mismatches

    before = verification_mismatches.value
    dst = tmp_path / "out.dcm"
    src = find("MR_small.dcm")
    corrupt = overridden_encoder(
        _uid.RLELossless, "tests.transcode.test_transcode_traps:corrupting_rle"
    )
    with corrupt, caplog.at_level(logging.ERROR, logger="node.transcode"):
        outcome = transcode_file(src, dst, [parse_target("RLELossless")])
    assert outcome.reasons == (
        "RLELossless: verification mismatch: decoded pixels differ from source",
    )
    assert verification_mismatches.value == before + 1
    assert dcmread(src).SOPInstanceUID in caplog.text
    assert dst.read_bytes() == src.read_bytes()


def corrupting_rle(frame, info, target):  # type: ignore[no-untyped-def]
    from node.transcode.encoders import encode_rle

    changed = frame.copy()
    changed.flat[0] += 1
    return encode_rle(changed, info, target)


def test_crashing_codec_does_not_kill_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ABORT_ENV, _uid.JPEGLSLossless)
    src = find("CT_small.dcm")
    ladder = [parse_target("JPEGLSLossless"), parse_target("RLELossless")]
    with TranscodePool(1) as pool:
        first = pool.transcode(src, tmp_path / "a.dcm", ladder)
        # The pool was rebuilt: the next instance works through a fresh worker.
        second = pool.transcode(src, tmp_path / "b.dcm", [parse_target("RLELossless")])
    assert first.fallback
    assert first.transfer_syntax == _uid.RLELossless
    assert len(first.reasons) == 1
    assert first.reasons[0].startswith("JPEGLSLossless: codec process died (SIGABRT)")
    _exact(src, tmp_path / "a.dcm")
    assert not second.fallback


def test_every_rung_crashing_ends_as_received(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ABORT_ENV, f"{_uid.JPEGLSLossless},{_uid.RLELossless}")
    src = find("CT_small.dcm")
    ladder = [parse_target("JPEGLSLossless"), parse_target("RLELossless")]
    with TranscodePool(1) as pool:
        outcome = pool.transcode(src, tmp_path / "a.dcm", ladder)
    assert outcome.fallback and len(outcome.reasons) == 2
    assert all("codec process died (SIGABRT)" in reason for reason in outcome.reasons)
    assert (tmp_path / "a.dcm").read_bytes() == src.read_bytes()
    assert outcome.transfer_syntax == dcmread(src).file_meta.TransferSyntaxUID
