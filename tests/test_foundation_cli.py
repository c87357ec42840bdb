"""`dicom-node echo` and `dicom-node send` against a running node; duplicates policies."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom

from tests.conftest import StartNode
from tests.corpus import CT_SMALL, PYDICOM_FILES
from tests.foundation_helpers import pynetdicom_store
from tests.support import NodeProcess, dicom_node, wait_until

DUPLICATE_SOP_INSTANCE = 0x0111


def peer(node: NodeProcess, ae: str = "DICOMNODE") -> str:
    return f"{ae}@127.0.0.1:{node.port}"


def archived(archive: Path) -> list[Path]:
    return sorted(p for p in archive.rglob("*.dcm") if ".incoming" not in p.parts)


def test_echo_succeeds_and_fails_with_exit_codes(start_node: StartNode) -> None:
    node = start_node()
    ok = dicom_node("echo", "--to", peer(node))
    assert ok.returncode == 0, ok.stderr
    assert f"C-ECHO to {peer(node)}: success" in ok.stdout
    wrong_ae = dicom_node("echo", "--to", peer(node, "NOTTHENODE"))
    assert wrong_ae.returncode == 1
    assert "no association" in wrong_ae.stderr


def test_send_a_folder_reports_counts(start_node: StartNode, tmp_path: Path) -> None:
    node = start_node()
    outgoing = tmp_path / "outgoing"
    outgoing.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "MR_truncated.dcm"):
        shutil.copy(PYDICOM_FILES / name, outgoing / name)
    (outgoing / "notes.txt").write_text("not DICOM")
    result = dicom_node("send", str(outgoing), "--to", peer(node), "-q")
    # rtplan.dcm's file meta names another SOP Instance UID than its dataset: refused.
    # MR_truncated.dcm goes out as it is on disk (not re-encoded whole by pydicom): refused.
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "sent: 3 (warnings: 0), failed: 3", result.stdout
    assert any("1 x not a readable DICOM file" in line and "notes.txt" in line for line in lines)
    assert any("1 x status 0xA900" in line and "rtplan.dcm" in line for line in lines)
    assert any("1 x status 0xC210" in line and "MR_truncated.dcm" in line for line in lines)
    assert wait_until(lambda: len(archived(tmp_path / "archive")) == 3, timeout=30)


def test_send_with_everything_stored_exits_0(start_node: StartNode, tmp_path: Path) -> None:
    node = start_node()
    result = dicom_node("send", str(CT_SMALL), "--to", peer(node), "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "sent: 1 (warnings: 0), failed: 0"


def test_send_to_nobody_fails(tmp_path: Path) -> None:
    from tests.support import free_port

    result = dicom_node("send", str(CT_SMALL), "--to", f"X@127.0.0.1:{free_port()}", "-q")
    assert result.returncode == 1
    assert "1 x association rejected or peer unreachable" in result.stdout


def duplicates_policy(policy: str) -> Callable[[dict[str, object]], None]:
    def edit(sections: dict[str, object]) -> None:
        sections["storage"][0]["duplicates"] = policy  # type: ignore[index]

    return edit


def second_version(tmp_path: Path) -> Path:
    """CT_small again: same SOP Instance UID (and so same path), other content."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.InstitutionName = "SECOND VERSION"
    path = tmp_path / "second.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def stored_institution(start_node: StartNode, tmp_path: Path, policy: str) -> tuple[int, str]:
    """Send CT_small then its second version under a policy: (second status, kept version)."""

    node = start_node(duplicates_policy(policy))
    archive = tmp_path / "archive"
    assert pynetdicom_store(node.port, CT_SMALL) == 0x0000
    assert wait_until(lambda: len(archived(archive)) == 1, timeout=30)
    status = pynetdicom_store(node.port, second_version(tmp_path))
    # Let the second store job (if any) finish before looking.
    assert wait_until(lambda: not list((tmp_path / "data" / "spool").glob("*.dcm")), timeout=30)
    (stored,) = archived(archive)
    return status, str(pydicom.dcmread(stored).get("InstitutionName", ""))


def test_duplicates_overwrite_keeps_the_newest(start_node: StartNode, tmp_path: Path) -> None:
    assert stored_institution(start_node, tmp_path, "overwrite") == (0x0000, "SECOND VERSION")


def test_duplicates_keep_keeps_the_first(start_node: StartNode, tmp_path: Path) -> None:
    status, kept = stored_institution(start_node, tmp_path, "keep")
    assert status == 0x0000
    assert kept == str(pydicom.dcmread(CT_SMALL).InstitutionName)


def test_duplicates_reject_answers_0111(start_node: StartNode, tmp_path: Path) -> None:
    status, kept = stored_institution(start_node, tmp_path, "reject")
    assert status == DUPLICATE_SOP_INSTANCE
    assert kept == str(pydicom.dcmread(CT_SMALL).InstitutionName)


def stored_after_patient_id_correction(
    start_node: StartNode, tmp_path: Path, policy: str
) -> list[str]:
    """Send CT_small, then the same SOP Instance UID with a corrected Patient ID.

    The layout puts the two versions in different folders; the policy is about
    the SOP Instance UID, so one file must remain. Returns the stored Patient IDs.
    """

    node = start_node(duplicates_policy(policy))
    archive = tmp_path / "archive"
    assert pynetdicom_store(node.port, CT_SMALL) == 0x0000
    assert wait_until(lambda: len(archived(archive)) == 1, timeout=30)
    corrected = pydicom.dcmread(CT_SMALL)
    corrected.PatientID = "CORRECTED"
    path = tmp_path / "corrected.dcm"
    corrected.save_as(path, enforce_file_format=True)
    assert pynetdicom_store(node.port, path) == 0x0000
    assert wait_until(lambda: not list((tmp_path / "data" / "spool").glob("*.dcm")), timeout=30)
    return sorted(str(pydicom.dcmread(p).PatientID) for p in archived(archive))


def test_overwrite_replaces_the_instance_even_in_another_folder(
    start_node: StartNode, tmp_path: Path
) -> None:
    assert stored_after_patient_id_correction(start_node, tmp_path, "overwrite") == ["CORRECTED"]


def test_keep_keeps_the_instance_even_if_it_would_land_elsewhere(
    start_node: StartNode, tmp_path: Path
) -> None:
    original = str(pydicom.dcmread(CT_SMALL).PatientID)
    assert stored_after_patient_id_correction(start_node, tmp_path, "keep") == [original]
