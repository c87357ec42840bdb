"""Storage layout: whatever a sender puts in a tag, the file lands inside the storage root."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.uid import generate_uid

from tests.conftest import StartNode
from tests.corpus import CT_SMALL
from tests.foundation_helpers import pynetdicom_store
from tests.support import wait_until

HOSTILE_PATIENT_IDS = {
    "dotdot": "../../etc/passwd",
    "separators": "a/b\\c",
    "only-dots": "..",
    "absolute": "/etc/shadow",
    "controls": "x\x01\x1b[31m\ty",
    "long": "P" * 300,
    "empty": "",
    "spaces": "   ",
    "windows": "C:\\Windows\\..\\x",
}
# The Patient ID folder each one must get: separators, controls and ':' become '_', the
# component is stripped of spaces and dots and cut to 64 bytes, and '\\' separates DICOM
# values (joined with '_'). A '..' left between underscores is a plain name, not a traversal.
EXPECTED_FOLDERS = {
    "dotdot": "_.._etc_passwd",
    "separators": "a_b_c",
    "only-dots": "UNKNOWN",
    "absolute": "_etc_shadow",
    "controls": "x__[31m_y",
    "long": "P" * 64,
    "empty": "UNKNOWN",
    "spaces": "UNKNOWN",
    "windows": "C__Windows_.._x",
}


def copy_with(folder: Path, name: str, **values: str | None) -> tuple[Path, str]:
    """CT_small with the given values (None = element removed) and a fresh SOP Instance UID."""
    ds = pydicom.dcmread(CT_SMALL)
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / f"{name}.dcm"
    # Hostile values are invalid DICOM on purpose: let pydicom write them anyway.
    settings = pydicom_config.settings
    before = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        ds.save_as(path, enforce_file_format=True)
    finally:
        settings.writing_validation_mode = before
    return path, str(ds.SOPInstanceUID)


@pytest.fixture
def senders_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "outgoing"
    folder.mkdir()
    return folder


def test_hostile_patient_ids_stay_inside_the_storage_root(
    start_node: StartNode, tmp_path: Path, senders_folder: Path
) -> None:
    node = start_node()
    archive = (tmp_path / "archive").resolve()
    sent = {}
    for name, patient_id in HOSTILE_PATIENT_IDS.items():
        path, uid = copy_with(senders_folder, name, PatientID=patient_id)
        assert pynetdicom_store(node.port, path) == 0x0000, name
        sent[uid] = name
    assert wait_until(lambda: len(stored_files(archive)) == len(sent), timeout=30), node.log()
    found = {}
    for path in stored_files(archive):
        assert path.resolve().is_relative_to(archive), path
        relative = path.resolve().relative_to(archive)
        assert all(len(part.encode()) <= 64 + len(".dcm") for part in relative.parts), relative
        assert not any(c < " " or c == "\\" for part in relative.parts for c in part), relative
        assert not any(part in ("", ".", "..") for part in relative.parts), relative
        found[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = relative
    assert set(found) == set(sent)
    # Layout = PatientID/Study/Series/SOP.dcm: 4 levels, whatever the Patient ID held.
    assert all(len(relative.parts) == 4 for relative in found.values()), found
    by_name = {sent[uid]: relative for uid, relative in found.items()}
    assert {name: relative.parts[0] for name, relative in by_name.items()} == EXPECTED_FOLDERS
    assert not (tmp_path / "etc").exists() and not Path("/etc/passwd.dcm").exists()


def test_missing_layout_value_becomes_a_placeholder(
    start_node: StartNode, tmp_path: Path, senders_folder: Path
) -> None:
    def by_station(sections: dict[str, object]) -> None:
        storage = sections["storage"][0]  # type: ignore[index]
        storage["layout"] = "{StationName}/{Modality}/{SOPInstanceUID}.dcm"

    node = start_node(by_station)
    path, uid = copy_with(senders_folder, "nostation", StationName=None)
    assert "StationName" not in pydicom.dcmread(path)
    assert pynetdicom_store(node.port, path) == 0x0000
    archive = tmp_path / "archive"
    assert wait_until(lambda: stored_files(archive), timeout=30)
    (stored,) = stored_files(archive)
    assert stored.relative_to(archive) == Path("UNKNOWN", "CT", f"{uid}.dcm")


def stored_files(archive: Path) -> list[Path]:
    return [p for p in archive.rglob("*.dcm") if ".incoming" not in p.parts]
