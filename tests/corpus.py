"""The test corpus: pydicom's own test files plus the pydicom-data package, offline.

Never use pydicom.data.get_testdata_files: it tries to download and hangs offline.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import pydicom
from pydicom.misc import is_dicom


def corpus_dirs() -> list[Path]:
    dirs = [Path(pydicom.__file__).parent / "data" / "test_files"]
    spec = importlib.util.find_spec("data_store")
    if spec is not None and spec.submodule_search_locations:
        dirs.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    return [d for d in dirs if d.is_dir()]


@cache
def _corpus() -> tuple[Path, ...]:
    found = []
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
