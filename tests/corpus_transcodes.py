"""The corpus transcoded once per test session, shared by the pixel test
(test_transcode_corpus) and the element-by-element test (test_element_equivalence).

Inputs are every corpus file plus Explicit VR Big Endian variants, made by DCMTK's
`dcmconv +tb`, of the little endian native corpus files that carry non-pixel OW, OF,
OD, OL or OV values (palette and segmented LUTs, overlays, waveforms, float data), and
of one synthesized file with float and private OW/OF/OD/OL/OV elements.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.transcode import Outcome, TranscodePool, parse_target
from node.transcode.targets import LOSSLESS_TARGETS
from tests.corpus import corpus_files, find
from tests.dcmtk_view import make_big_endian

Results = dict[tuple[UID, Path], tuple[Path, Outcome]]

_RAW_VRS = ("OW", "OF", "OD", "OL", "OV")
_ROOT_PIXELS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
PRIVATE_CREATOR = "DICOMNODE BYTE ORDER"


def has_raw_multibyte_values(ds: Dataset, root: bool = True) -> bool:
    """True when ds holds an OW/OF/OD/OL/OV value other than the top-level pixel data."""
    for raw in ds.elements():
        if root and raw.tag in _ROOT_PIXELS:
            continue
        element = ds[raw.tag]
        if element.VR == "SQ":
            if any(has_raw_multibyte_values(item, False) for item in element.value or ()):
                return True
        elif element.VR in _RAW_VRS and element.value:
            return True
    return False


def with_float_and_private_values(src: Path, dst: Path) -> Path:
    """src plus a private block of OW, OF, OD, OL and OV values with recognisable bit
    patterns, and standard OF/OL/OD elements in a sequence, written as Explicit VR Little Endian."""
    ds = dcmread(src)
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "OW", np.arange(1, 9, dtype="<u2").tobytes())
    block.add_new(0x02, "OF", np.array([1.5, -2.25, 3e10], dtype="<f4").tobytes())
    block.add_new(0x03, "OD", np.array([1.5, -2.25e-300], dtype="<f8").tobytes())
    block.add_new(0x04, "OL", np.array([1, 0x01020304], dtype="<u4").tobytes())
    block.add_new(0x05, "OV", np.array([1, 0x0102030405060708], dtype="<u8").tobytes())
    surface = Dataset()
    surface.PointCoordinatesData = np.array([0.5, 1.25, -7.0], dtype="<f4").tobytes()
    surface.LongPrimitivePointIndexList = np.array([1, 70000], dtype="<u4").tobytes()
    surface.DoublePointCoordinatesData = np.array([0.25, 1e-5], dtype="<f8").tobytes()
    ds.SurfacePointsSequence = [surface]  # standard OF, OL and OD, nested
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@cache
def big_endian_variants(folder: Path) -> tuple[Path, ...]:
    variants: list[Path] = []
    for index, src in enumerate(corpus_files()):
        try:
            ds = dcmread(src)
            syntax = UID(ds.file_meta.TransferSyntaxUID)
        except Exception:
            continue
        if syntax.is_compressed or not syntax.is_little_endian:
            continue
        if has_raw_multibyte_values(ds):
            variants.append(make_big_endian(src, folder / f"{index}-{src.stem}_tb.dcm"))
    synthetic = with_float_and_private_values(find("MR_small.dcm"), folder / "float-private.dcm")
    variants.append(make_big_endian(synthetic, folder / "float-private_tb.dcm"))
    return tuple(variants)


def transcode_inputs(folder: Path) -> list[Path]:
    return [*corpus_files(), *big_endian_variants(folder / "big-endian")]


@cache
def lossless_transcodes(folder: Path) -> Results:
    """Every input x every lossless target, through the worker pool, once per session."""
    jobs = [
        (syntax, src, folder / "out" / syntax / f"{index}.dcm")
        for syntax in LOSSLESS_TARGETS
        for index, src in enumerate(transcode_inputs(folder))
    ]
    with TranscodePool(2) as pool, ThreadPoolExecutor(4) as threads:

        def one(job: tuple[UID, Path, Path]) -> Outcome:
            syntax, src, dst = job
            return pool.transcode(src, dst, [parse_target(syntax)])

        outcomes = list(threads.map(one, jobs))
    return {(s, src): (dst, o) for (s, src, dst), o in zip(jobs, outcomes, strict=True)}
