"""Outputs checked by outside tools (dciodvfy, pylibjpeg-openjpeg), the CLI, and speed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from openjpeg import decode as openjpeg_decode
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import DeflatedExplicitVRLittleEndian, HTJ2KLossless, HTJ2KLosslessRPCL

from node.transcode import parse_target, transcode_file
from node.transcode.targets import LOSSLESS_TARGETS
from tests.corpus import find
from tests.tools import require_tool
from tests.transcode_support import source_pixels

_DCIODVFY_CANNOT_READ = (DeflatedExplicitVRLittleEndian, HTJ2KLossless, HTJ2KLosslessRPCL)
ONE_PER_MODALITY = ["CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm", "RG1_UNCR.dcm"]


def _dciodvfy_errors(path: Path) -> set[str]:
    done = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
    lines = (done.stdout + done.stderr).splitlines()
    return {re.sub(r"\s+", " ", line) for line in lines if line.startswith("Error")}


@pytest.mark.parametrize("name", ONE_PER_MODALITY)
def test_dciodvfy_finds_no_new_errors(name: str, tmp_path: Path) -> None:
    require_tool("dciodvfy")
    src = find(name)
    before = _dciodvfy_errors(src)
    # The installed dciodvfy cannot inflate Deflated Explicit VR Little Endian and does not
    # know the HTJ2K UIDs (it reads them as native), so those are left to the corpus test.
    for syntax in [s for s in LOSSLESS_TARGETS if s not in _DCIODVFY_CANNOT_READ]:
        dst = tmp_path / f"{syntax}.dcm"
        outcome = transcode_file(src, dst, [parse_target(syntax)])
        assert not outcome.fallback, outcome.reasons
        new = _dciodvfy_errors(dst) - before
        assert new == set(), f"{syntax}: {new}"


@pytest.mark.parametrize("syntax", ["HTJ2KLossless", "HTJ2KLosslessRPCL"])
@pytest.mark.parametrize("name", ["693_UNCR.dcm", "US1_UNCR.dcm", "MR_small_bigendian.dcm"])
def test_htj2k_is_a_raw_codestream_decoded_exactly_by_pylibjpeg_openjpeg(
    syntax: str, name: str, tmp_path: Path
) -> None:
    src, dst = find(name), tmp_path / "out.dcm"
    assert not transcode_file(src, dst, [parse_target(syntax)]).fallback
    (fragment,) = generate_frames(dcmread(dst).PixelData, number_of_frames=1)
    assert fragment[:4] == b"\xff\x4f\xff\x51"  # SOC, SIZ: no JP2/JPH boxes
    expected = source_pixels(src).array[0]
    decoded = openjpeg_decode(fragment)
    assert decoded.dtype.kind == expected.dtype.kind
    assert np.array_equal(decoded, expected)
    cod = fragment.find(b"\xff\x52")
    assert fragment[cod + 5] == 2  # progression order RPCL
    if syntax == "HTJ2KLosslessRPCL":
        assert b"\xff\x55" in fragment[: fragment.find(b"\xff\x90")]  # TLM marker


def test_cli_transcodes_a_folder_and_summarises(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ["CT_small.dcm", "liver_1frame.dcm", "rtplan.dcm"]:
        shutil.copy(find(name), folder / name)
    (folder / "notes.txt").write_text("not DICOM")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli.transcode_cli",
            str(folder),
            "--to",
            "JPEGLSLossless,ExplicitVRLittleEndian",
            "-o",
            str(tmp_path / "out"),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "converted: 1" in done.stdout
    assert "fell back: 2" in done.stdout
    assert "JPEGLSLossless: 1-bit images unsupported" in done.stdout
    assert "failed (unreadable): 1" in done.stdout
    assert done.returncode == 1
    written = dcmread(tmp_path / "out" / "in" / "liver_1frame.dcm")
    assert written.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def _speed(encode, array: np.ndarray) -> tuple[float, float]:
    start = time.perf_counter()
    encoded = encode(array)
    seconds = time.perf_counter() - start
    return array.nbytes / seconds / 1e6, array.nbytes / len(encoded)


def test_measure_htj2k_against_j2k_lossless() -> None:
    """Prints encode MB/s and compression ratio; asserts only that both are lossless."""
    for name in ["693_UNCR.dcm", "MR2_UNCR.dcm", "RG1_UNCR.dcm"]:
        frame = source_pixels(find(name)).array[0]
        bits = dcmread(find(name), stop_before_pixels=True).BitsStored
        htj2k = _speed(lambda a: imagecodecs.htj2k_encode(a, reversible=True), frame)
        j2k = _speed(
            lambda a, b=bits: imagecodecs.jpeg2k_encode(
                a, codecformat="J2K", reversible=True, bitspersample=b, numthreads=1
            ),
            frame,
        )
        print(
            f"\n{name}: HTJ2K {htj2k[0]:.0f} MB/s ratio {htj2k[1]:.2f}; "
            f"J2K {j2k[0]:.0f} MB/s ratio {j2k[1]:.2f}"
        )
        assert htj2k[1] > 1 and j2k[1] > 1
