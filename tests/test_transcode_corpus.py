"""Every corpus file through every lossless target: each output either decodes to exactly
the source pixels (with our decoder and, where one exists, an independent one) or is the
documented as-received fallback."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID, ImplicitVRLittleEndian

from node.transcode.pixels import same_pixels
from node.transcode.targets import LOSSLESS_TARGETS
from tests.corpus_transcodes import Results, lossless_transcodes, transcode_inputs
from tests.transcode_support import (
    has_independent_decoder,
    independent_check,
    our_decode,
    source_pixels,
)

# Attributes a lossless transcode may change (PS3.3 C.7.6.3 follows the written bytes).
_MAY_CHANGE = {
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "LossyImageCompression",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    """Transcode once a session (shared with test_element_equivalence)."""
    return lossless_transcodes(tmp_path_factory.getbasetemp() / "corpus-transcodes")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The corpus and the big endian variants of its files with non-pixel OW/OF/OD values."""
    return transcode_inputs(tmp_path_factory.getbasetemp() / "corpus-transcodes")


@pytest.mark.parametrize("syntax", LOSSLESS_TARGETS, ids=lambda s: UID(s).keyword)
def test_every_output_is_exact_or_documented_fallback(
    syntax: UID, results: Results, inputs: list[Path], tmp_path: Path
) -> None:
    counts: Counter[str] = Counter()
    mismatches: list[str] = []
    to_check_independently: list[tuple[Path, Path]] = []
    for src in inputs:
        dst, outcome = results[(syntax, src)]
        if outcome.fallback:
            counts["fell back"] += 1
            assert outcome.reasons and all(
                r.startswith(UID(syntax).keyword) for r in outcome.reasons
            )
            assert dst.read_bytes() == src.read_bytes(), f"{src.name}: fallback is not as received"
            continue
        counts["converted"] += 1
        assert outcome.transfer_syntax == syntax
        written = dcmread(dst)
        assert written.file_meta.TransferSyntaxUID == syntax
        source = dcmread(src)
        assert written.get("SOPInstanceUID") == source.get("SOPInstanceUID")
        _assert_same_attributes(source, written)
        expected = source_pixels(src)
        if expected is None:
            continue  # no pixel data: nothing to compare but the attributes
        if not same_pixels(our_decode(dst).array, expected.array):
            mismatches.append(src.name)
        if has_independent_decoder(syntax) and syntax.is_compressed:
            to_check_independently.append((src, dst))
    with ThreadPoolExecutor(4) as threads:
        checked = list(
            threads.map(
                lambda pair: (
                    pair[0].name,
                    independent_check(pair[1], source_pixels(pair[0]), tmp_path),
                ),
                to_check_independently,
            )
        )
    independent_mismatches = [name for name, status in checked if status == "mismatch"]
    counts.update(f"independent: {status}" for _, status in checked)
    unchecked = [f"{name} ({status})" for name, status in checked if status.startswith("tool")]
    print(f"\n{UID(syntax).keyword}: {dict(counts)}; not independently comparable: {unchecked}")
    assert mismatches == []
    assert independent_mismatches == []
    assert counts["converted"] > 0


def _assert_same_attributes(source, written) -> None:
    """Everything outside the Image Pixel description of the bytes is kept as it was."""
    source_big_endian = not source.original_encoding[1]
    implicit_vr = written.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    for element in source:
        if element.keyword in _MAY_CHANGE or element.tag.element == 0:
            continue  # group lengths are retired; pydicom drops them on write
        assert element.tag in written, f"{element.keyword or element.tag} dropped"
        if source_big_endian and (isinstance(element.value, bytes) or element.VR == "SQ"):
            # OW/OF/OD... values are byte-swapped on purpose; test_element_equivalence
            # compares them (and sequences) with DCMTK's conversion.
            continue
        if implicit_vr and (element.tag.is_private or element.VR == "SQ"):
            # Implicit VR loses the VR of private elements and of US/OW-ambiguous items
            # such as LUT Data in sequences: the same bytes read back as another type.
            continue
        assert written[element.tag].value == element.value, f"{element.keyword} changed"
