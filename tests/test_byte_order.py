"""Byte order (issue 10): an Explicit VR Big Endian source written in a little endian
syntax keeps every value, not only its pixels. OW values are 16-bit words, OF and OL
32-bit, OD and OV 64-bit; OB and UN are byte streams. Checked against the little endian
original and against DCMTK (`dcmconv +te`, `dcmdump`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom import uid as _uid
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.forward.derived import DerivedFiles, Untranscodable
from node.transcode import TranscodePool, parse_target, transcode_file
from node.transcode.rung import try_rung
from node.transcode.targets import Target
from tests.corpus import find
from tests.corpus_transcodes import with_float_and_private_values
from tests.dcmtk_view import dcmtk_view, differences, make_big_endian
from tests.support import dicom_node, require_tool

# Every little endian target whose encoder takes these images (the ALOKA palette image is
# 16-bit; JPEG 2000 and HTJ2K run in the corpus test, in worker processes).
TARGETS = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    _uid.DeflatedExplicitVRLittleEndian,
    _uid.RLELossless,
    _uid.JPEGLSLossless,
    _uid.JPEGLosslessSV1,
]
PALETTE_DATA = ("RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData")
SEGMENTED_DATA = (
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
)


def _transcoded(src: Path, syntax: UID, folder: Path) -> Dataset:
    dst = folder / f"{src.stem}.{UID(syntax).keyword}.dcm"
    outcome = transcode_file(src, dst, [parse_target(syntax)])
    assert not outcome.fallback, outcome.reasons
    written = dcmread(dst)
    assert written.file_meta.TransferSyntaxUID == syntax
    return written


def _value_bytes(ds: Dataset, keyword_or_tag: str | int) -> bytes:
    value = ds[keyword_or_tag].value
    assert isinstance(value, bytes), f"{keyword_or_tag}: {value!r}"
    return value


@pytest.fixture(scope="module")
def big_endian(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """DCMTK's big endian conversions of the little endian originals."""
    folder = tmp_path_factory.mktemp("big-endian")
    names = ("examples_palette.dcm", "examples_overlay.dcm", "waveform_ecg.dcm")
    files = {name: make_big_endian(find(name), folder / name) for name in names}
    synthetic = with_float_and_private_values(find("MR_small.dcm"), folder / "float-le.dcm")
    files["float-le.dcm"] = synthetic
    files["float.dcm"] = make_big_endian(synthetic, folder / "float.dcm")
    return files


@pytest.mark.parametrize("syntax", TARGETS, ids=lambda s: UID(s).keyword)
def test_aloka_segmented_palette_keeps_its_values(syntax: UID, tmp_path: Path) -> None:
    source = find("gdcm-US-ALOKA-16_big.dcm")
    little_endian_original = dcmread(find("gdcm-US-ALOKA-16.dcm"))
    written = _transcoded(source, syntax, tmp_path)
    for keyword in SEGMENTED_DATA:
        assert _value_bytes(written, keyword) == _value_bytes(little_endian_original, keyword)
    first_words = np.frombuffer(_value_bytes(written, SEGMENTED_DATA[0])[:8], "<u2")
    assert first_words.tolist() == [0x0000, 0x0002, 0x0000, 0x7070]  # as dcmconv +te gives
    # pydicom can expand the LUT again ("unknown segment type 8224" before the fix).
    pixels = written.pixel_array
    assert np.array_equal(
        apply_color_lut(pixels, written), apply_color_lut(pixels, little_endian_original)
    )


def test_aloka_through_the_cli_matches_dcmtk(tmp_path: Path) -> None:
    """`dicom-node transcode` goes through the same encode path."""
    source = find("gdcm-US-ALOKA-16_big.dcm")
    done = dicom_node(
        "transcode", str(source), "--to", "JPEGLSLossless", "-o", str(tmp_path / "out")
    )
    assert done.returncode == 0, done.stderr
    output = tmp_path / "out" / source.name
    assert dcmread(output).file_meta.TransferSyntaxUID == _uid.JPEGLSLossless
    expected = dcmtk_view(source, tmp_path / "view-in")
    actual = dcmtk_view(output, tmp_path / "view-out")
    assert expected.lines
    assert differences(expected, actual, lossy_source=False) == []
    dump = subprocess.run(
        [require_tool("dcmdump"), "+P", "0028,1221", str(output)], capture_output=True, text=True
    )
    assert "0000\\0002\\0000\\7070\\0001\\0005" in dump.stdout


@pytest.mark.parametrize("syntax", TARGETS, ids=lambda s: UID(s).keyword)
def test_palette_lut_data_of_a_big_endian_source(
    syntax: UID, big_endian: dict[str, Path], tmp_path: Path
) -> None:
    original = dcmread(find("examples_palette.dcm"))
    written = _transcoded(big_endian["examples_palette.dcm"], syntax, tmp_path)
    for keyword in (*PALETTE_DATA, "BluePaletteColorLookupTableData"):
        assert _value_bytes(written, keyword) == _value_bytes(original, keyword), keyword


@pytest.mark.parametrize("syntax", TARGETS, ids=lambda s: UID(s).keyword)
def test_overlay_palette_and_icon_of_a_big_endian_source(
    syntax: UID, big_endian: dict[str, Path], tmp_path: Path
) -> None:
    original = dcmread(find("examples_overlay.dcm"))
    written = _transcoded(big_endian["examples_overlay.dcm"], syntax, tmp_path)
    assert _value_bytes(written, 0x60003000) == _value_bytes(original, 0x60003000)
    assert np.array_equal(written.overlay_array(0x6000), original.overlay_array(0x6000))
    # The Icon Image Sequence's own palette and 16-bit pixels are nested OW values.
    icon, original_icon = written.IconImageSequence[0], original.IconImageSequence[0]
    for keyword in (*PALETTE_DATA, "PixelData"):
        assert _value_bytes(icon, keyword) == _value_bytes(original_icon, keyword), keyword


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=lambda s: UID(s).keyword
)
def test_waveform_data_and_private_ow_of_a_big_endian_source(
    syntax: UID, big_endian: dict[str, Path], tmp_path: Path
) -> None:
    original = dcmread(find("waveform_ecg.dcm"))
    written = _transcoded(big_endian["waveform_ecg.dcm"], syntax, tmp_path)
    for index, group in enumerate(original.WaveformSequence):
        assert _value_bytes(written.WaveformSequence[index], "WaveformData") == _value_bytes(
            group, "WaveformData"
        )
    assert np.array_equal(written.waveform_array(0), original.waveform_array(0))
    assert _value_bytes(written, 0x14551000) == _value_bytes(original, 0x14551000)  # private OW
    assert _value_bytes(written, 0x14551001) == _value_bytes(original, 0x14551001)  # OB as is


@pytest.mark.parametrize("syntax", TARGETS, ids=lambda s: UID(s).keyword)
def test_float_and_private_values_of_a_big_endian_source(
    syntax: UID, big_endian: dict[str, Path], tmp_path: Path
) -> None:
    original = dcmread(big_endian["float-le.dcm"])
    written = _transcoded(big_endian["float.dcm"], syntax, tmp_path)
    for element in range(0x1001, 0x1006):  # private OW, OF, OD, OL, OV
        tag = 0x00090000 | element
        assert _value_bytes(written, tag) == _value_bytes(original, tag), hex(tag)
    surface, original_surface = written.SurfacePointsSequence[0], original.SurfacePointsSequence[0]
    for keyword in ("PointCoordinatesData", "LongPrimitivePointIndexList"):
        assert _value_bytes(surface, keyword) == _value_bytes(original_surface, keyword)
    assert _value_bytes(surface, "DoublePointCoordinatesData") == _value_bytes(
        original_surface, "DoublePointCoordinatesData"
    )
    assert np.frombuffer(_value_bytes(surface, "PointCoordinatesData"), "<f4").tolist() == [
        0.5,
        1.25,
        -7.0,
    ]


def test_multi_valued_us_and_ss_were_already_right(tmp_path: Path) -> None:
    """pydicom parses US/SS into numbers, so they follow the output's byte order."""
    source = find("gdcm-US-ALOKA-16_big.dcm")
    original = dcmread(find("gdcm-US-ALOKA-16.dcm"))
    written = _transcoded(source, ExplicitVRLittleEndian, tmp_path)
    descriptor = "SegmentedRedPaletteColorLookupTableData"
    assert written.RedPaletteColorLookupTableDescriptor == (
        original.RedPaletteColorLookupTableDescriptor
    )
    assert descriptor in written


def test_un_elements_keep_their_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """UN is a byte stream (as in DCMTK): not swapped, and not reinterpreted through the
    dictionary in the source's byte order."""
    ds = dcmread(find("MR_small.dcm"))
    little = tmp_path / "un-le.dcm"
    monkeypatch.setattr(pydicom.config, "replace_un_with_known_vr", False)
    ds.add_new(0x00280106, "UN", b"\x01\x00")  # Smallest Image Pixel Value, sent as UN
    ds.private_block(0x0011, "DICOMNODE UN", create=True)
    ds.add_new(0x00111010, "UN", b"\x01\x02\x03\x04")
    ds.save_as(little, enforce_file_format=True)
    monkeypatch.undo()
    big = make_big_endian(little, tmp_path / "un-be.dcm")
    output = tmp_path / "un-be.ExplicitVRLittleEndian.dcm"
    assert not transcode_file(big, output, [parse_target(ExplicitVRLittleEndian)]).fallback
    monkeypatch.setattr(pydicom.config, "replace_un_with_known_vr", False)
    written = dcmread(output)
    assert written[0x00280106].VR == "UN"
    assert written[0x00280106].value == b"\x01\x00"
    assert written[0x00111010].value == b"\x01\x02\x03\x04"
    expected = dcmtk_view(big, tmp_path / "view-in")
    actual = dcmtk_view(output, tmp_path / "view-out")
    assert differences(expected, actual, lossy_source=False) == []


def test_big_endian_is_never_written(tmp_path: Path) -> None:
    """Explicit VR Big Endian is retired and our pixel path writes little endian: asking
    for it is refused with a reason, never half-converted."""
    with pytest.raises(ValueError, match="cannot encode"):
        parse_target("ExplicitVRBigEndian")
    source = find("MR_small.dcm")
    result = try_rung(source, tmp_path / "out.dcm", Target(ExplicitVRBigEndian, False), False)
    assert not result.ok
    assert "big endian" in result.reason
    assert not (tmp_path / "out.dcm").exists()


def test_forwarding_refuses_a_big_endian_copy_and_keeps_the_received_one(tmp_path: Path) -> None:
    """A peer that accepts only big endian gets an instance received in big endian as it
    is; one received in little endian is Untranscodable (the next accepted syntax is tried)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    little = spool / "little.dcm"
    little.write_bytes(find("MR_small.dcm").read_bytes())
    big = spool / "big.dcm"
    big.write_bytes(find("MR_small_bigendian.dcm").read_bytes())
    with TranscodePool(1) as pool:
        derived = DerivedFiles(spool, pool.transcode)
        derived.prepare()
        assert derived.get(big, ExplicitVRBigEndian, "ExplicitVRBigEndian") == big
        assert derived.get(big, ExplicitVRBigEndian, ExplicitVRBigEndian) == big
        with pytest.raises(Untranscodable, match="BigEndian"):
            derived.get(little, ExplicitVRLittleEndian, ExplicitVRBigEndian)
        # and the ELE copy of the big endian instance is right, element by element
        copy = derived.get(big, ExplicitVRBigEndian, "ExplicitVRLittleEndian")
    assert copy != big
    assert pydicom.dcmread(copy).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    expected = dcmtk_view(big, tmp_path / "view-in")
    actual = dcmtk_view(copy, tmp_path / "view-out")
    assert expected.lines
    assert differences(expected, actual, lossy_source=False) == []


def test_swap_widths_follow_ps3_5() -> None:
    from node.transcode.byteorder import SWAP_WIDTHS, ByteOrderError, swap_values

    assert SWAP_WIDTHS == {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
    assert swap_values(bytes(range(8)), 2) == bytes([1, 0, 3, 2, 5, 4, 7, 6])
    assert swap_values(bytes(range(8)), 4) == bytes([3, 2, 1, 0, 7, 6, 5, 4])
    assert swap_values(bytes(range(8)), 8) == bytes([7, 6, 5, 4, 3, 2, 1, 0])
    with pytest.raises(ByteOrderError):
        swap_values(b"\x00\x01\x02", 2)


def test_odd_length_ow_is_refused_instead_of_being_half_swapped() -> None:
    from node.transcode.byteorder import ByteOrderError, convert_byte_order

    ds = Dataset()
    ds.add_new(0x00091001, "OW", b"\x00\x01\x02")
    with pytest.raises(ByteOrderError, match=r"\(0009,1001\) OW: 3 bytes"):
        convert_byte_order(ds, ExplicitVRBigEndian, ExplicitVRLittleEndian)
    assert convert_byte_order(ds, ExplicitVRLittleEndian, ImplicitVRLittleEndian) == 0


@pytest.mark.parametrize(
    "name", ["rtplan_truncated.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"]
)
def test_a_truncated_source_is_kept_as_received_not_made_whole(name: str, tmp_path: Path) -> None:
    """Found by the element-by-element check: pydicom reads a truncated file leniently
    (a value cut short, or Pixel Data dropped), and writing that would give a well-formed
    instance that lies. It falls back to the bytes as received instead."""
    source = find(name)
    dst = tmp_path / "out.dcm"
    outcome = transcode_file(source, dst, [parse_target(ExplicitVRLittleEndian)])
    assert outcome.fallback
    assert "source truncated" in outcome.reasons[0]
    assert dst.read_bytes() == source.read_bytes()


def test_implicit_vr_output_keeps_private_sequences_readable(tmp_path: Path) -> None:
    """Found by the element check: a private sequence of explicit length (as dcmconv +tb
    writes them) came out of an Implicit VR transcode as opaque UN bytes for any reader
    without Philips' dictionary. Undefined length keeps it a sequence (CP 246)."""
    written = _transcoded(find("OBXXXX1A_expb.dcm"), ImplicitVRLittleEndian, tmp_path)
    assert written[0x200D110D].is_undefined_length
    output = tmp_path / "OBXXXX1A_expb.ImplicitVRLittleEndian.dcm"
    dump = subprocess.run(
        [require_tool("dcmdump"), "+P", "200d,110d", str(output)], capture_output=True, text=True
    )
    assert dump.stdout.startswith("(200d,110d) SQ"), dump.stdout[:200]  # DCMTK: not UN
