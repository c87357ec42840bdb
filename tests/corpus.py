"""The test corpus: pydicom's own test files plus the pydicom-data package, offline;
copies of them with fresh SOP Instance UIDs, and a file's dataset bytes as a C-STORE carries them.

Never use pydicom.data.get_testdata_files: it tries to download and hangs offline.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.misc import is_dicom
from pydicom.uid import generate_uid

# pydicom's own test files (always installed with pydicom).
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT_SMALL = PYDICOM_FILES / "CT_small.dcm"  # CT, Explicit VR Little Endian, 128x128
MR_SMALL = PYDICOM_FILES / "MR_small.dcm"  # MR, Explicit VR Little Endian, 64x64


def corpus_dirs() -> list[Path]:
    dirs = [PYDICOM_FILES]
    spec = importlib.util.find_spec("data_store")
    if spec is not None and spec.submodule_search_locations:
        dirs.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    return [d for d in dirs if d.is_dir()]


@cache
def _corpus() -> tuple[Path, ...]:
    found: list[Path] = []
    for folder in corpus_dirs():
        found.extend(p for p in sorted(folder.rglob("*")) if p.is_file() and _readable(p))
    return tuple(found)


def corpus_files() -> list[Path]:
    """Every file in the corpus that pydicom.dcmread can read (non-DICOM files skipped)."""
    return list(_corpus())


def _readable(path: Path) -> bool:
    try:
        if not is_dicom(path):
            pydicom.dcmread(path, force=False)
        return True
    except Exception:
        return False


def find(name: str) -> Path:
    """A corpus file by file name (the first match)."""
    for path in _corpus():
        if path.name == name:
            return path
    raise FileNotFoundError(name)


def dataset_bytes(part10: Path | bytes) -> bytes:
    """A Part 10 file's dataset as encoded: everything after the preamble, "DICM" and the
    group 0002 File Meta elements. This is what a C-STORE of the file carries, byte for
    byte, with Data Set Trailing Padding kept where the file has it."""
    with part10.open("rb") if isinstance(part10, Path) else BytesIO(part10) as stream:
        read_preamble(stream, False)  # raises for a file without "DICM"
        _read_file_meta_info(stream)
        return stream.read()


def copies_with_new_uids(source: Path, folder: Path, count: int) -> list[Path]:
    """`count` copies of a file, each with a fresh SOP Instance UID (the pixels are the same),
    named `<SOP Instance UID>.dcm` (so a folder can take more of them)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    paths = []
    for _ in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = folder / f"{uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sop_instance_uid(data: bytes | Path) -> str:
    """The SOP Instance UID of a Part 10 file, on disk or as bytes."""
    source = BytesIO(data) if isinstance(data, bytes) else data
    return str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
