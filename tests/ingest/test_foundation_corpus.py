"""Every corpus file, sent by DCMTK storescu in its own transfer syntax, is stored unchanged.

The corpus is pydicom's test files plus pydicom-data (never fetched with
pydicom.data.get_testdata_files, which tries to download). One storescu
association per transfer syntax batch. No corpus file uses an HTJ2K syntax
(checked at test time): storescu 3.6.7 would not know those UIDs, so they
would go with pynetdicom's SCU instead (see test_htj2k_is_stored_as_sent).
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom import uid as _uid
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from tests.conftest import StartNode
from tests.corpus import corpus_dirs
from tests.foundation_helpers import associate, raw_sending, status_of
from tests.storescu_profiles import (
    Classified,
    SendableFile,
    StorescuRun,
    by_syntax,
    classify,
    send_as_is,
)
from tests.support import BOTH_ACCEPTORS, NodeProcess, wait_until

HTJ2K_SYNTAXES = {_uid.HTJ2KLossless, _uid.HTJ2KLosslessRPCL, _uid.HTJ2K}


def all_corpus_paths() -> list[Path]:
    return [p for folder in corpus_dirs() for p in sorted(folder.rglob("*")) if p.is_file()]


def differences(sent: Dataset, stored: Dataset, where: str = "") -> list[str]:
    """Element-by-element comparison, recursing into sequences; pixel bytes included."""
    found: list[str] = []
    for tag in sorted(set(sent.keys()) | set(stored.keys())):
        label = f"{where}{tag}"
        if tag not in stored:
            found.append(f"{label} missing in stored")
        elif tag not in sent:
            found.append(f"{label} not in sent")
        elif sent[tag].VR == "SQ" and stored[tag].VR == "SQ":
            items = zip(sent[tag].value, stored[tag].value, strict=False)
            if len(sent[tag].value) != len(stored[tag].value):
                found.append(f"{label} item count differs")
            for index, (a, b) in enumerate(items):
                found += differences(a, b, f"{label}[{index}].")
        elif sent[tag] != stored[tag]:
            found.append(f"{label} {sent[tag].keyword or ''} differs")
    return found


def unique_uid_rounds(files: Sequence[SendableFile]) -> list[list[SendableFile]]:
    """Split a batch so no SOP Instance UID repeats within a round (the corpus has copies)."""
    rounds: list[list[SendableFile]] = []
    for item in files:
        for candidate in rounds:
            if all(other.sop_instance_uid != item.sop_instance_uid for other in candidate):
                candidate.append(item)
                break
        else:
            rounds.append([item])
    return rounds


def stored_by_uid(archive: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in archive.rglob("*.dcm"):
        if ".incoming" in path.parts:
            continue
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        found.setdefault(uid, []).append(path)
    return found


def verify_round(
    run: StorescuRun,
    files: Sequence[SendableFile],
    archive: Path,
    spool: Path,
    normalise: Callable[[Dataset], Dataset],
) -> list[str]:
    """Problems with the acknowledged instances of one round (empty = all stored unchanged)."""
    acked = [f for f in files if run.statuses.get(f.path) == 0x0000]
    drained = wait_until(
        lambda: len(list(archive.rglob("*.dcm"))) >= len(acked) and not list(spool.glob("*.dcm")),
        timeout=60,
    )
    problems = [] if drained else [f"not drained: spool still has {list(spool.iterdir())}"]
    stored = stored_by_uid(archive)
    for item in acked:
        paths = stored.get(item.sop_instance_uid, [])
        if len(paths) != 1:
            problems.append(f"{item.path.name}: {len(paths)} stored files")
            continue
        sent, kept = pydicom.dcmread(item.path), pydicom.dcmread(paths[0])
        if str(kept.file_meta.TransferSyntaxUID) != item.transfer_syntax:
            problems.append(f"{item.path.name}: stored as {kept.file_meta.TransferSyntaxUID}")
        diff = differences(normalise(sent), normalise(kept))
        if diff:
            problems.append(f"{item.path.name}: {diff[:5]}")
    return problems


def dcmtk_normalised(ds: Dataset) -> Dataset:
    """What storescu does to every dataset it re-encodes, undone for comparison.

    DCMTK sends from its parsed dataset, not the file's bytes: it recomputes or
    drops group lengths (gggg,0000), drops trailing padding (FFFC,FFFC) and
    writes encapsulated Pixel Data as OB even when the file says OW. Measured
    against DCMTK's own storescp, these are the only changes it makes.
    """
    encapsulated = ds.file_meta.TransferSyntaxUID.is_compressed
    return _without_dcmtk_changes(ds, encapsulated)


def _without_dcmtk_changes(ds: Dataset, encapsulated: bool) -> Dataset:
    copy = Dataset()
    for element in ds:
        if element.tag.element == 0 or element.tag == 0xFFFCFFFC:
            continue
        if element.VR == "SQ":
            items = [_without_dcmtk_changes(item, encapsulated) for item in element.value]
            element = DataElement(element.tag, "SQ", items)
        elif element.tag == 0x7FE00010 and encapsulated:
            element = DataElement(element.tag, "OB", element.value)
        copy.add(element)
    return copy


@dataclass
class PassReport:
    """What one sender achieved over the corpus."""

    sender: str
    associations: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    refused: dict[Path, int] = field(default_factory=dict)
    not_sent: dict[Path, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self, classified: Classified) -> str:
        lines = [
            f"{self.sender}: {len(classified.sendable)} files sent on {self.associations}"
            f" associations, {self.statuses[0]} acknowledged, refused:"
            f" { {f'0x{s:04X}': n for s, n in self.statuses.items() if s} },"
            f" not sent by the sender: {len(self.not_sent)}"
        ]
        lines += [f"  refused 0x{s:04X}: {p.name}" for p, s in self.refused.items()]
        lines += [f"  not sent: {p.name}: {why}" for p, why in self.not_sent.items()]
        return "\n".join(lines)


Sender = Callable[[int, Sequence[SendableFile], str, Path], StorescuRun]


def send_with_storescu(
    port: int, files: Sequence[SendableFile], syntax: str, workdir: Path
) -> StorescuRun:
    return send_as_is(
        port, [f.path for f in files], syntax, [f.sop_class_uid for f in files], workdir
    )


def send_with_pynetdicom(
    port: int, files: Sequence[SendableFile], syntax: str, workdir: Path
) -> StorescuRun:
    """pynetdicom sends a file's dataset bytes exactly as they are on disk."""
    classes = sorted({f.sop_class_uid for f in files})
    assoc = associate(port, [(uid, [syntax]) for uid in classes], calling="PYNETDICOM")
    assert assoc.is_established, "the node refused the association"
    statuses: dict[Path, int] = {}
    not_sent: dict[Path, str] = {}
    try:
        for item in files:
            try:
                with raw_sending():
                    statuses[item.path] = status_of(assoc.send_c_store(item.path))
            except Exception as exc:
                not_sent[item.path] = f"pynetdicom: {type(exc).__name__}: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()
    return StorescuRun(0, statuses, not_sent, "")


def send_corpus(
    node: NodeProcess,
    classified: Classified,
    sender: Sender,
    name: str,
    tmp_path: Path,
    normalise: Callable[[Dataset], Dataset],
) -> PassReport:
    archive, spool = tmp_path / "archive", tmp_path / "data" / "spool"
    report = PassReport(name)
    for syntax, batch in by_syntax(classified.sendable).items():
        for files in unique_uid_rounds(batch):
            run = sender(node.port, files, syntax, tmp_path)
            report.associations += 1
            report.statuses.update(run.statuses.values())
            report.not_sent.update(run.not_sent)
            report.refused.update({p: s for p, s in run.statuses.items() if s != 0x0000})
            report.problems += verify_round(run, files, archive, spool, normalise)
            shutil.rmtree(archive)
            archive.mkdir()
    return report


def unchanged(ds: Dataset) -> Dataset:
    return ds


# storescu cannot read or encode these (its reasons are printed by the test).
STORESCU_CANNOT_SEND = {
    "MR_truncated.dcm",
    "explicit_VR-UN.dcm",
    "emri_small_jpeg_2k_lossless_too_short.dcm",
    "rtdose_rle.dcm",
    "rtdose_rle_1frame.dcm",
    "rtplan_truncated.dcm",
    "SC_rgb_jpeg.dcm",
}
# Files whose dataset is cut short: the node must refuse them (0xC210), never store them.
TRUNCATED = {
    "MR_truncated.dcm",
    "rtplan_truncated.dcm",
    "emri_small_jpeg_2k_lossless_too_short.dcm",
    # Garbage after a few elements: one claims 1.3 GB (storescu cannot read it either).
    "SC_rgb_jpeg.dcm",
}


def meta_names_another_instance(path: Path) -> bool:
    """pynetdicom (chunked) takes the C-STORE's SOP Instance UID from the file meta."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.file_meta.get("MediaStorageSOPInstanceUID") != ds.get("SOPInstanceUID")


@pytest.fixture(scope="module")
def classified() -> Classified:
    found = classify(all_corpus_paths())
    assert found.sendable, "no corpus found: install pydicom-data (pip install .[test])"
    assert not {f.transfer_syntax for f in found.sendable} & HTJ2K_SYNTAXES, (
        "the corpus now has HTJ2K files: send those with pynetdicom (storescu 3.6.7 lacks them)"
    )
    unsendable = Counter(found.unsendable.values())
    print(
        f"\ncorpus: {len(found.sendable) + len(found.unsendable)} files,"
        f" {len(found.sendable)} sendable, not sendable: {dict(unsendable)}"
    )
    return found


@BOTH_ACCEPTORS
def test_corpus_from_storescu_is_stored_as_sent(
    start_node: StartNode, tmp_path: Path, classified: Classified
) -> None:
    """DCMTK storescu as the modality; each file proposed in its own syntax only."""
    node = start_node()
    report = send_corpus(
        node, classified, send_with_storescu, "storescu", tmp_path, dcmtk_normalised
    )
    print(report.summary(classified))
    assert node.alive(), node.log()
    assert not report.problems, "\n".join(report.problems)
    assert report.statuses[0] >= len(classified.sendable) - len(STORESCU_CANNOT_SEND)
    assert {p.name for p in report.not_sent} <= STORESCU_CANNOT_SEND, report.not_sent
    assert not report.refused, {p.name: hex(s) for p, s in report.refused.items()}


@BOTH_ACCEPTORS
def test_corpus_from_pynetdicom_is_stored_byte_exact(
    start_node: StartNode, tmp_path: Path, classified: Classified
) -> None:
    """pynetdicom sends the file's bytes untouched, so the stored dataset must equal the file's."""
    node = start_node()
    report = send_corpus(node, classified, send_with_pynetdicom, "pynetdicom", tmp_path, unchanged)
    print(report.summary(classified))
    assert node.alive(), node.log()
    assert not report.problems, "\n".join(report.problems)
    assert not report.not_sent, report.not_sent
    # A request whose SOP Instance UID is not the dataset's is refused, not stored
    # under a name that lies: 0xA900 (the dataset does not match the request).
    mismatched = {f.path.name for f in classified.sendable if meta_names_another_instance(f.path)}
    expected = dict.fromkeys(TRUNCATED, 0xC210) | dict.fromkeys(mismatched - TRUNCATED, 0xA900)
    assert {p.name: s for p, s in report.refused.items()} == expected
    assert report.statuses[0] == len(classified.sendable) - len(expected) > 150


@pytest.mark.parametrize("syntax", sorted(HTJ2K_SYNTAXES))
def test_htj2k_is_stored_as_sent(start_node: StartNode, tmp_path: Path, syntax: str) -> None:
    """storescu 3.6.7 does not know the HTJ2K UIDs: pynetdicom's SCU sends them instead."""
    from tests.foundation_helpers import htj2k_copy, pynetdicom_store

    source = htj2k_copy(tmp_path, syntax)
    node = start_node()
    assert pynetdicom_store(node.port, source) == 0x0000
    archive = tmp_path / "archive"
    assert wait_until(lambda: list(archive.rglob("*.dcm")), timeout=30)
    (stored,) = list(archive.rglob("*.dcm"))
    kept = pydicom.dcmread(stored)
    assert kept.file_meta.TransferSyntaxUID == syntax
    assert differences(pydicom.dcmread(source), kept) == []
