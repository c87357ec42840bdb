"""The Annex E options (PS3.15 E.3) that a [deidentify] table can name, and what each keeps.

No installed library ships the option columns of Table E.1-1, so the attributes an
option keeps are written here from that table (2025 edition), by rule where the
column follows one (UIDs, dates and times) and by keyword where it does not. An
option's C (clean) entries are not kept: cleaning is not implemented, so those
attributes get the Basic Profile's action, which removes more, never less.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag


@dataclass(frozen=True)
class Option:
    """Picklable (worker processes get it): a rule is a module-level function."""

    name: str  # as the config writes it
    code_value: str  # CID 7050 De-identification Method, scheme DCM
    code_meaning: str
    keywords: frozenset[str] = frozenset()  # kept as they are
    rule: Callable[[int, str], bool] | None = None  # (tag, Basic Profile action) -> kept

    def keeps(self, tag: int, action: str) -> bool:
        if self.rule is not None:
            return self.rule(tag, action)
        return keyword_for_tag(tag) in self.keywords


def _vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


# Column "Rtn. UIDs Opt.": K for the U attributes but two, and the reference sequences.
_UIDS_NOT_KEPT = frozenset({"DigitalSignatureUID", "UID"})
_UID_SEQUENCES = frozenset(
    {
        "ReferencedImageSequence",
        "ReferencedPatientSequence",
        "ReferencedPerformedProcedureStepSequence",
        "ReferencedStudySequence",
        "SourceImageSequence",
    }
)


def _keeps_uid(tag: int, action: str) -> bool:
    keyword = keyword_for_tag(tag)
    return (action == "U" and keyword not in _UIDS_NOT_KEPT) or keyword in _UID_SEQUENCES


# Column "Rtn. Long. Full Dates Opt.": K for dates and times, but not the patient's birth
# or a GPS fix, and for three that are not DA/DT/TM.
_DATES_NOT_KEPT = frozenset({"PatientBirthDate", "PatientBirthTime", "GPSTimeStamp"})
_DATES_KEPT = frozenset({"TimezoneOffsetFromUTC", "CertifiedTimestamp", "FrameOriginTimestamp"})


def _keeps_date(tag: int, action: str) -> bool:
    keyword = keyword_for_tag(tag)
    if keyword in _DATES_KEPT:
        return True
    return _vr(tag) in ("DA", "DT", "TM") and keyword not in _DATES_NOT_KEPT


# Column "Rtn. Dev. Id. Opt.": its K entries (its C entries, the AE titles, are not kept).
DEVICE_IDENTITY = frozenset(
    {
        "BeamHoldTransitionDateTime", "CalibrationDate", "CalibrationDateTime",
        "CalibrationTime", "CassetteID", "DateOfInstallation", "DateOfLastCalibration",
        "DateOfLastDetectorCalibration", "DateOfManufacture", "DateTimeOfLastCalibration",
        "DetectorID", "DeviceDescription", "DeviceLabel", "DeviceSerialNumber", "DeviceUID",
        "GantryID", "GeneratorID", "LensMake", "LensModel", "LensSerialNumber",
        "LensSpecification", "ManufacturerDeviceClassUID", "ManufacturerDeviceIdentifier",
        "ModifyingDeviceID", "ModifyingSystem",
        "PerformedStationGeographicLocationCodeSequence", "PerformedStationName",
        "PerformedStationNameCodeSequence", "PlateID", "ScheduledProcedureStepLocation",
        "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationName",
        "ScheduledStationNameCodeSequence", "ScheduledStudyLocation", "SourceManufacturer",
        "SourceSerialNumber", "StationName", "TimeOfLastCalibration",
        "TimeOfLastDetectorCalibration", "TransducerIdentificationSequence",
        "TreatmentMachineName", "UDISequence", "UniqueDeviceIdentifier", "XRayDetectorID",
        "XRayDetectorLabel", "XRaySourceID",
    }
)  # fmt: skip

# Column "Rtn. Inst. Id. Opt.".
INSTITUTION_IDENTITY = frozenset(
    {
        "ClinicalTrialCoordinatingCenterName", "ClinicalTrialProtocolEthicsCommitteeName",
        "ClinicalTrialSiteID", "ClinicalTrialSiteName", "InstitutionAddress",
        "InstitutionCodeSequence", "InstitutionName", "InstitutionalDepartmentName",
        "InstitutionalDepartmentTypeCodeSequence", "SourceOfPreviousValues",
    }
)  # fmt: skip

# Column "Rtn. Pat. Chars. Opt.": its K entries (Allergies and the like are C).
PATIENT_CHARACTERISTICS = frozenset(
    {
        "EthnicGroup", "PatientAge", "PatientSex", "PatientSexNeutered", "PatientSize",
        "PatientWeight", "PregnancyStatus", "SelectorASValue", "SmokingStatus",
    }
)  # fmt: skip

BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")

OPTIONS = {
    option.name: option
    for option in (
        Option("retain-uids", "113110", "Retain UIDs Option", rule=_keeps_uid),
        Option(
            "retain-longitudinal-dates",
            "113106",
            "Retain Longitudinal Temporal Information Full Dates Option",
            rule=_keeps_date,
        ),
        Option(
            "retain-device-identity",
            "113109",
            "Retain Device Identity Option",
            keywords=DEVICE_IDENTITY,
        ),
        Option(
            "retain-institution-identity",
            "113112",
            "Retain Institution Identity Option",
            keywords=INSTITUTION_IDENTITY,
        ),
        Option(
            "retain-patient-characteristics",
            "113108",
            "Retain Patient Characteristics Option",
            keywords=PATIENT_CHARACTERISTICS,
        ),
    )
}

# Named in the standard, refused by the config: what each would need that the node lacks.
NOT_SUPPORTED = {
    "retain-safe-private": "needs the safe private attributes of Table E.3.10-1",
    "retain-longitudinal-modified-dates": "date shifting is not implemented",
    "clean-descriptors": "cleaning free text is not implemented",
    "clean-structured-content": "cleaning structured content is not implemented",
    "clean-graphics": "cleaning graphics is not implemented",
    "clean-pixel-data": "pixels are never altered",
    "clean-recognizable-visual-features": "pixels are never altered",
}


class OptionError(ValueError):
    pass


def parse_options(names: tuple[str, ...]) -> tuple[Option, ...]:
    for name in names:
        if name in NOT_SUPPORTED:
            raise OptionError(f"{name!r} is not supported: {NOT_SUPPORTED[name]}")
        if name not in OPTIONS:
            raise OptionError(f"{name!r} is not an option; use one of {', '.join(OPTIONS)}")
    return tuple(OPTIONS[name] for name in dict.fromkeys(names))
