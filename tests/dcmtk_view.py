"""DCMTK's view of an instance, for element-by-element comparison (issue 10).

An instance is decompressed with a tool outside our code base where one exists
(dcmdjpls, dcmdrle, dcmdjpeg; gdcmconv --raw for JPEG 2000), converted to Explicit VR
Little Endian by `dcmconv +te -g`, and dumped with `dcmdump +L` (every value, in full).
HTJ2K has no such tool (DCMTK 3.6.7 and GDCM 3.0 cannot read it): it is decoded with
pydicom and pylibjpeg-openjpeg, our pinned verifier, and written as Explicit VR Little
Endian by pydicom before going through the same `dcmconv +te` and `dcmdump`.
"""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom import uid as _uid
from pydicom.uid import UID

from node.transcode.pixels import decode_pixels, same_pixels
from tests.support import require_tool

_DECOMPRESSORS: dict[UID, list[str]] = {
    _uid.JPEGLSLossless: ["dcmdjpls"],
    _uid.JPEGLSNearLossless: ["dcmdjpls"],
    _uid.RLELossless: ["dcmdrle"],
    _uid.JPEGLosslessSV1: ["dcmdjpeg"],
    _uid.JPEGLossless: ["dcmdjpeg"],
    _uid.JPEGBaseline8Bit: ["dcmdjpeg"],
    _uid.JPEGExtended12Bit: ["dcmdjpeg"],
    _uid.JPEG2000Lossless: ["gdcmconv", "--raw"],
    _uid.JPEG2000: ["gdcmconv", "--raw"],
}
_PIXELS_ONLY = ("gdcmconv",)
_NATIVE = (
    _uid.ExplicitVRLittleEndian,
    _uid.ImplicitVRLittleEndian,
    _uid.DeflatedExplicitVRLittleEndian,
    _uid.ExplicitVRBigEndian,
)

# What a lossless transcode may rightly change (issue 10): Photometric Interpretation
# and Planar Configuration describe the written bytes. Pixel Data (top level only; an
# icon image's is compared) is compared by value instead. File meta and group lengths
# are not part of the data set's content. Extended Offset Table (Lengths) index the old
# fragments, and Lossy Image Compression "01" is added when a lossy source is decoded
# (PS3.3 C.7.6.1.1.5: once lossy, always marked lossy).
EXCLUDED_TOP_LEVEL = {
    "(0028,0004)",  # Photometric Interpretation
    "(0028,0006)",  # Planar Configuration
    "(7fe0,0010)",  # Pixel Data
    "(7fe0,0008)",  # Float Pixel Data
    "(7fe0,0009)",  # Double Float Pixel Data
    "(7fe0,0001)",  # Extended Offset Table
    "(7fe0,0002)",  # Extended Offset Table Lengths
}
LOSSY_MARK = "(0028,2110)"

_TAG = re.compile(r"^(\s*)(\([0-9a-f]{4},[0-9a-f]{4}\))")


@dataclass(frozen=True)
class View:
    """The dump lines that must match, and the native file whose pixels to compare."""

    lines: tuple[str, ...]
    native: Path | None
    decoder: str
    problems: tuple[str, ...] = field(default=())


def dcmtk_view(path: Path, workdir: Path, *, via_implicit: bool = False) -> View:
    """Decompress, convert to Explicit VR Little Endian, dump. Never raises for bad input:
    what went wrong is in View.problems.

    via_implicit: convert to Implicit VR Little Endian with DCMTK first, the reference
    for an Implicit VR output, where private elements lose their VR (PS3.5 7.1.3)."""
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        syntax = UID(dcmread(path, stop_before_pixels=True).file_meta.get("TransferSyntaxUID", ""))
        decompressed, pixels, decoder, problems = _decompressed(path, syntax, workdir)
    except Exception as error:  # pydicom can neither decode nor write it
        return View((), None, "none", (f"unreadable: {str(error).splitlines()[0][:160]}",))
    if via_implicit:
        implicit = workdir / "implicit.dcm"
        # -e: sequences of undefined length, so that a private one reads back as a
        # sequence rather than as UN bytes (as pydicom writes them).
        done = _run(["dcmconv", "+ti", "-g", "-e", str(decompressed), str(implicit)])
        if done.returncode != 0:
            return View((), None, decoder, (*problems, f"dcmconv +ti: {done.stderr[:200]}"))
        decompressed = implicit
    native = workdir / "ele.dcm"
    done = _run(["dcmconv", "+te", "-g", str(decompressed), str(native)])
    if done.returncode != 0:
        return View((), None, decoder, (*problems, f"dcmconv: {done.stderr.strip()[:200]}"))
    pixels = pixels or native
    # +uc: a standard element sent as UN is shown with its dictionary VR, which is what
    # pydicom writes once it has read it. The value must still be the same.
    dump = _run(["dcmdump", "+L", "-Un", "+uc", str(native)])
    if dump.returncode != 0:
        return View((), pixels, decoder, (*problems, f"dcmdump: {dump.stderr.strip()[:200]}"))
    return View(tuple(comparable_lines(dump.stdout)), pixels, decoder, tuple(problems))


def _decompressed(
    path: Path, syntax: UID, workdir: Path
) -> tuple[Path, Path | None, str, list[str]]:
    """(file for the element view, file for the pixels if another one, decoder, problems)."""
    if syntax in _NATIVE or not syntax:
        return path, None, "none", []
    problems: list[str] = []
    tool = _DECOMPRESSORS.get(syntax)
    out = workdir / "decompressed.dcm"
    if tool:
        done = _run([*tool, str(path), str(out)])
        if done.returncode == 0 and tool[0] not in _PIXELS_ONLY:
            return out, None, tool[0], []
        if done.returncode != 0:
            problems.append(f"{tool[0]} failed: {(done.stderr or done.stdout).strip()[:160]}")
    pixels = out if tool and not problems else None
    try:
        # gdcmconv also rewrites elements (it expands Segmented Palette LUTs, for one):
        # its output is trusted for the pixels only.
        decoder = f"{tool[0]} (pixels)" if pixels else "pydicom"
        return _pydicom_decompressed(path, workdir), pixels, decoder, problems
    except Exception as error:
        # Nothing decodes these pixels: the elements are already little endian, so
        # DCMTK can still show them, from the compressed file without its pixels.
        problems.append(f"pydicom cannot decode: {str(error).splitlines()[0][:120]}")
        return _elements_only(path, workdir), None, "elements only", problems


def _elements_only(path: Path, workdir: Path) -> Path:
    ds = dcmread(path)
    if "PixelData" in ds:
        del ds.PixelData
    ds.file_meta.TransferSyntaxUID = _uid.ExplicitVRLittleEndian
    out = workdir / "elements-only.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def _pydicom_decompressed(path: Path, workdir: Path) -> Path:
    ds = dcmread(path)
    ds.decompress(as_rgb=False, generate_instance_uid=False)  # YBR_FULL stays YBR_FULL
    out = workdir / "pydicom-decompressed.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def comparable_lines(dump: str) -> list[str]:
    """dcmdump lines without file meta, group lengths, comments and what may change."""
    lines: list[str] = []
    skipping_depth: int | None = None
    for line in dump.splitlines():
        match = _TAG.match(line)
        if not match:
            continue  # "# Dicom-File-Format" and other comments
        depth, tag = len(match.group(1)), match.group(2)
        if skipping_depth is not None:
            if depth > skipping_depth:
                continue  # inside an excluded element (e.g. the fragments of Pixel Data)
            skipping_depth = None
        if tag.startswith("(0002,") or tag.endswith(",0000)"):
            continue
        if depth == 0 and tag in EXCLUDED_TOP_LEVEL:
            skipping_depth = depth
            continue
        lines.append(line.rstrip())
    return lines


def differences(expected: View, actual: View, *, lossy_source: bool) -> list[str]:
    """Lines only in one of the two views, as '-expected' / '+actual'."""
    want, got = list(expected.lines), list(actual.lines)
    if lossy_source:
        got = [line for line in got if not (line.startswith(LOSSY_MARK) and "[01]" in line)]
        want = [line for line in want if not (line.startswith(LOSSY_MARK) and "[01]" in line)]
    if want == got:
        return []
    return [
        line
        for line in difflib.unified_diff(want, got, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def native_pixels(view: View) -> np.ndarray | None:
    """The pixel values of DCMTK's native file, or None when it has none."""
    if view.native is None:
        return None
    ds = dcmread(view.native)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return None
    return np.asarray(ds.pixel_array)


def make_big_endian(src: Path, dst: Path) -> Path:
    """DCMTK's Explicit VR Big Endian conversion of src (`dcmconv +tb`)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    done = _run(["dcmconv", "+tb", str(src), str(dst)])
    assert done.returncode == 0, f"dcmconv +tb {src.name}: {done.stderr}"
    return dst


def tools_available() -> bool:
    return all(shutil.which(tool) for tool in ("dcmconv", "dcmdump", "dcmdjpls", "dcmdrle"))


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool(command[0]), *command[1:]],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
    )


# Jobs for a process pool (importable, picklable arguments and results).


def input_job(path: Path, workdir: Path) -> tuple[View, View, Path | None]:
    """DCMTK's views of an input (as Explicit VR, and through Implicit VR), and its pixels
    as decoded by pydicom, saved to a .npy."""
    view = dcmtk_view(path, workdir / "explicit")
    implicit = dcmtk_view(path, workdir / "implicit", via_implicit=True)
    try:
        pixels = decode_pixels(dcmread(path)).array
    except Exception:
        return view, implicit, None
    reference = workdir / "pixels.npy"
    np.save(reference, pixels)
    return view, implicit, reference


def output_job(path: Path, workdir: Path, reference: Path | None) -> tuple[View, str]:
    """DCMTK's view of an output and whether its pixels, as decompressed for that view,
    equal the input's: "same", "differ", "none" (neither has pixels) or a reason."""
    view = dcmtk_view(path, workdir)
    if view.native is None:
        return view, "no native file"
    try:
        written = decode_pixels(dcmread(view.native)).array
    except Exception as error:
        return view, "none" if reference is None else f"undecodable: {error}"[:120]
    if reference is None:
        return view, "differ"  # pixels where the input had none that decode
    return view, "same" if same_pixels(written, np.load(reference)) else "differ"
