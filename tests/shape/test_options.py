"""Annex E options and `keep`: what each keeps, and how the copy says which applied."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from node.shape import Shaping
from node.shape.deidentify import Deidentification
from node.shape.options import parse_options
from node.shape.selectors import parse_selector
from node.transcode import transcode_file
from tests.corpus import find

SECRET = b"options test key, sixteen+ bytes"


def _deidentified(
    tmp_path: Path, *options: str, keep: tuple[str, ...] = (), path: Path | None = None
) -> tuple[Dataset, Dataset]:
    shaping = Shaping(
        deidentification=Deidentification(
            parse_options(options), tuple(parse_selector(k) for k in keep), SECRET
        )
    )
    source, out = path or find("CT_small.dcm"), tmp_path / "out.dcm"
    transcode_file(source, out, [], shaping=shaping)
    return dcmread(source), dcmread(out)


def test_without_options_dates_identity_and_uids_go(tmp_path: Path) -> None:
    source, copy = _deidentified(tmp_path)
    assert source.StudyDate and copy.StudyDate == ""  # Z
    assert copy.get("StationName") != source.StationName
    assert copy.StudyInstanceUID != source.StudyInstanceUID
    assert copy.PatientSex == ""  # Z
    assert copy.LongitudinalTemporalInformationModified == "REMOVED"


def test_retain_longitudinal_dates_keeps_dates_not_the_birth_date(tmp_path: Path) -> None:
    ds = dcmread(find("CT_small.dcm"))
    ds.PatientBirthDate = "19610312"  # CT_small's is empty
    ds.save_as(tmp_path / "born.dcm", enforce_file_format=True)
    source, copy = _deidentified(tmp_path, "retain-longitudinal-dates", path=tmp_path / "born.dcm")
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentTime", "StudyTime"):
        assert copy.get(keyword) == source.get(keyword), keyword
    assert source.PatientBirthDate == "19610312" and copy.PatientBirthDate == ""  # still Z
    assert copy.LongitudinalTemporalInformationModified == "UNMODIFIED"
    codes = [item.CodeValue for item in copy.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113106"]


def test_retain_device_identity_keeps_the_station_and_serial_number(tmp_path: Path) -> None:
    source, copy = _deidentified(tmp_path, "retain-device-identity")
    assert copy.StationName == source.StationName
    assert copy.get("DeviceSerialNumber") == source.get("DeviceSerialNumber")
    assert copy.get("InstitutionName") != source.InstitutionName


def test_retain_institution_identity_and_patient_characteristics(tmp_path: Path) -> None:
    source, copy = _deidentified(
        tmp_path, "retain-institution-identity", "retain-patient-characteristics"
    )
    assert copy.InstitutionName == source.InstitutionName
    assert copy.PatientSex == source.PatientSex
    assert copy.get("PatientAge") == source.get("PatientAge")
    assert copy.PatientName == ""


def test_retain_uids_keeps_every_uid(tmp_path: Path) -> None:
    source, copy = _deidentified(tmp_path, "retain-uids")
    assert copy.SOPInstanceUID == source.SOPInstanceUID
    assert copy.StudyInstanceUID == source.StudyInstanceUID
    assert copy.FrameOfReferenceUID == source.FrameOfReferenceUID


def test_keep_names_what_stays_as_received_private_blocks_too(tmp_path: Path) -> None:
    source, copy = _deidentified(
        tmp_path, keep=("(0009,xxxx)@GEMS_IDEN_01", "(0009,0010)", "StationName")
    )
    kept = [t for t in list(source.keys()) if t.group == 0x0009]
    assert kept and all(copy[t].value == source[t].value for t in kept)
    assert copy.StationName == source.StationName
    assert not [t for t in list(copy.keys()) if t.group == 0x0019]  # other private groups go
