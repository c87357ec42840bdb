"""Benchmark inputs: copies of pydicom-data test images, each with a new SOP Instance UID.

Built once and cached under bench/out/inputs (git-ignored); a manifest records
what was built so a later run reuses the files instead of writing 430 MB again.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MULTIFRAME_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC


@dataclass(frozen=True)
class Workload:
    """One kind of instance, sent as many copies."""

    name: str  # CT, MR, CR
    source: str  # file name in pydicom-data
    files: tuple[Path, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def subset(self, count: int) -> Workload:
        return Workload(self.name, self.source, self.files[:count])


# name, pydicom-data file, copies in a full run
WORKLOADS = (("CT", "693_UNCR.dcm", 200), ("MR", "MR2_UNCR.dcm", 50), ("CR", "RG1_UNCR.dcm", 30))


def pydicom_data_dir() -> Path:
    """Where pydicom-data keeps its files: <site-packages>/data_store/data."""
    try:
        import data_store  # installed by the pydicom-data package
    except ImportError:
        raise SystemExit(
            "pydicom-data is not installed: pip install pydicom-data (it is a test extra)"
        ) from None
    return Path(data_store.__file__).parent / "data"


def build_workloads(out: Path) -> list[Workload]:
    """The CT, MR and CR copies, built on first use and cached."""
    source_dir = pydicom_data_dir()
    workloads = []
    for name, source, count in WORKLOADS:
        folder = out / "inputs" / name
        manifest = folder / "manifest.json"
        expected = {"source": source, "count": count}
        if not (manifest.exists() and json.loads(manifest.read_text()) == expected):
            _write_copies(source_dir / source, folder, count)
            manifest.write_text(json.dumps(expected))
        files = tuple(folder / f"{i:04d}.dcm" for i in range(count))
        workloads.append(Workload(name, source, files))
    return workloads


def _write_copies(source: Path, folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for i in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)


def build_multiframe(out: Path, size: int) -> Path:
    """A synthetic multi-frame instance of about `size` bytes of pixel data (16-bit frames).

    Pixel Data is streamed to disk frame by frame, so building a 1 GiB file
    needs no 1 GiB of memory.
    """
    rows = cols = 512
    frame_bytes = rows * cols * 2
    frames = max(1, size // frame_bytes)
    path = out / "inputs" / "big" / f"multiframe_{frames}x{rows}x{cols}.dcm"
    if path.exists() and path.stat().st_size > frames * frame_bytes:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _multiframe_header(rows, cols, frames)
    partial = path.with_suffix(".part")
    ds.save_as(partial, enforce_file_format=True)
    with partial.open("ab") as fp:
        pixel_bytes = frames * frame_bytes
        fp.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))
        frame = bytes(range(256)) * (frame_bytes // 256)
        for _ in range(frames):
            fp.write(frame)
    partial.rename(path)
    return path


def _multiframe_header(rows: int, cols: int, frames: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MULTIFRAME_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MULTIFRAME_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BENCH"
    ds.PatientName = "Bench^Multiframe"
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds
