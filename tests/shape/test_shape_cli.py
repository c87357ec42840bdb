"""`dicom-node transcode --coerce FILE --deidentify`: the same code, offline."""

from __future__ import annotations

import os
from pathlib import Path

from pydicom import dcmread

from node.shape.uidmap import UidMap
from tests.corpus import find
from tests.support import dicom_node


def test_transcode_coerces_and_deidentifies_offline_and_writes_nothing_it_refuses(
    tmp_path: Path,
) -> None:
    key = tmp_path / "uid.key"
    key.write_bytes(b"offline key of thirty-two bytes!")
    os.chmod(key, 0o600)
    coerce = tmp_path / "coerce.toml"
    coerce.write_text('set = { PatientID = "RESEARCH-{PatientID}" }\ndelete = ["StudyID"]\n')
    out = tmp_path / "out"
    done = dicom_node(
        "transcode", "--coerce", str(coerce), "--deidentify", "--uid-secret-file", str(key),
        "--option", "retain-longitudinal-dates", "--option", "retain-device-identity",
        "--to", "JPEGLSLossless", "-o", str(out),
        str(find("CT_small.dcm")), str(find("US1_UNCR.dcm")),
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr  # one refused
    assert (
        "applying: PS3.15 Basic Profile (2026c) with retain-longitudinal-dates,"
        " retain-device-identity" in done.stderr
    )
    assert "converted: 1" in done.stdout
    assert "refused (not written): 1" in done.stdout
    assert "US1_UNCR.dcm: refused for de-identification" in done.stdout
    assert not (out / "US1_UNCR.dcm").exists()
    source, copy = dcmread(find("CT_small.dcm")), dcmread(out / "CT_small.dcm")
    assert copy.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    assert copy.PatientID == "RESEARCH-ANONYMOUS"  # templates see de-identified values
    assert "StudyID" not in copy
    assert copy.StudyDate == source.StudyDate
    assert copy.StationName == source.StationName  # the options reach the worker processes
    assert copy.StudyInstanceUID == UidMap(key.read_bytes().strip()).remap(source.StudyInstanceUID)


def test_transcode_refuses_a_bad_coerce_file_naming_the_key(tmp_path: Path) -> None:
    coerce = tmp_path / "coerce.toml"
    coerce.write_text('set = { PatientNam = "x" }\n')
    done = dicom_node(
        "transcode", "--coerce", str(coerce), "-o", str(tmp_path / "out"), str(find("CT_small.dcm"))
    )
    assert done.returncode == 2
    assert "coerce.toml: set.PatientNam: 'PatientNam' is not a DICOM keyword" in done.stderr
