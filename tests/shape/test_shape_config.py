"""[storage|destination].coerce and .deidentify: bad keys are config errors naming the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.config.model import parse_config
from node.config.schema import ConfigError
from node.shape.build import build_shaping


def _config(tmp_path: Path, **target: object) -> dict[str, object]:
    return {
        "node": {"data_dir": str(tmp_path / "data")},
        "storage": [{"name": "archive", "path": str(tmp_path / "archive")}],
        "destination": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, **target}
        ],
    }


def _key(tmp_path: Path, data: bytes = b"0123456789abcdef0123", mode: int = 0o600) -> str:
    path = tmp_path / "uid.key"
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def _error(tmp_path: Path, **target: object) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(tmp_path, **target), tmp_path / "config.toml")
    return str(caught.value)


BROKEN = {
    "not a keyword": (
        {"coerce": {"set": {"PatientIDD": "x"}}},
        "destination[0].coerce.set.PatientIDD: 'PatientIDD' is not a DICOM keyword",
    ),
    "not a keyword in a template": (
        {"coerce": {"set": {"PatientID": "A-{PatientIdd}"}}},
        "destination[0].coerce.set.PatientID: {PatientIdd} is not a DICOM keyword",
    ),
    "unbalanced template": (
        {"coerce": {"set": {"PatientID": "A-{PatientID"}}},
        "destination[0].coerce.set.PatientID: unbalanced braces",
    ),
    "a sequence cannot be set": (
        {"coerce": {"set": {"OtherPatientIDsSequence": "x"}}},
        "destination[0].coerce.set.OtherPatientIDsSequence: OtherPatientIDsSequence has VR SQ",
    ),
    "not a string": (
        {"coerce": {"set": {"PatientID": 5}}},
        "destination[0].coerce.set.PatientID: must be a template string",
    ),
    "bad delete": (
        {"coerce": {"delete": ["(0010,00ZZ)"]}},
        "destination[0].coerce.delete: '(0010,00ZZ)' is not a DICOM keyword",
    ),
    "private tag in an even group": (
        {"coerce": {"delete": ["(0010,xx10)"]}},
        "destination[0].coerce.delete: '(0010,xx10)': (gggg,xxee) names private tags",
    ),
    "whole block without creator": (
        {"coerce": {"delete": ["(0029,xxxx)"]}},
        "destination[0].coerce.delete: '(0029,xxxx)': a whole private block needs its creator",
    ),
    "unknown profile": (
        {"deidentify": {"profile": "full"}},
        "destination[0].deidentify.profile: must be one of none, basic",
    ),
    "unsupported option": (
        {
            "deidentify": {
                "profile": "basic",
                "options": ["clean-pixel-data"],
                "uid_secret_file": "x",
            }
        },
        "destination[0].deidentify.options: 'clean-pixel-data' is not supported: pixels are never",
    ),
    "unknown option": (
        {"deidentify": {"profile": "basic", "options": ["retain-everything"]}},
        "destination[0].deidentify.options: 'retain-everything' is not an option",
    ),
    "no key": (
        {"deidentify": {"profile": "basic"}},
        "destination[0].deidentify.uid_secret_file: is required",
    ),
    "options without the profile": (
        {"deidentify": {"options": ["retain-uids"]}},
        'destination[0].deidentify.options: needs profile = "basic"',
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_bad_coerce_or_deidentify_key_is_a_config_error_naming_it(
    case: str, tmp_path: Path
) -> None:
    target, message = BROKEN[case]
    assert message in _error(tmp_path, **target)


def test_the_uid_key_must_be_long_enough_and_not_world_readable(tmp_path: Path) -> None:
    short = _key(tmp_path, b"short")
    assert "holds 5 bytes; a UID key needs at least 16" in _error(
        tmp_path, deidentify={"profile": "basic", "uid_secret_file": short}
    )
    readable = _key(tmp_path, mode=0o644)
    assert "is readable by every user" in _error(
        tmp_path, deidentify={"profile": "basic", "uid_secret_file": readable}
    )
    missing = str(tmp_path / "nowhere.key")
    assert "deidentify.uid_secret_file: cannot be read" in _error(
        tmp_path, deidentify={"profile": "basic", "uid_secret_file": missing}
    )


def test_the_issue_example_loads_and_builds_one_shaping(tmp_path: Path) -> None:
    config = parse_config(
        _config(
            tmp_path,
            coerce={
                "set": {
                    "IssuerOfPatientID": "SITE-A",
                    "InstitutionName": "Site A Hospital",
                    "PatientID": "A-{PatientID}",
                },
                "delete": ["OtherPatientIDs", "(0009,xx10)"],
            },
            deidentify={
                "profile": "basic",
                "options": ["retain-longitudinal-dates", "retain-device-identity"],
                "uid_secret_file": _key(tmp_path),
            },
        ),
        tmp_path / "config.toml",
    )
    pacs = config.destinations[0]
    shaping = build_shaping(pacs.coerce, pacs.deidentify)
    assert shaping is not None
    assert shaping.describe() == (
        "PS3.15 Basic Profile (2026c) with retain-longitudinal-dates, retain-device-identity;"
        " coerce set IssuerOfPatientID, InstitutionName, PatientID;"
        " delete OtherPatientIDs, (0009,xx10)"
    )
    archive = config.storage[0]
    assert build_shaping(archive.coerce, archive.deidentify) is None  # stored as received


def test_storage_commitment_cannot_go_with_remapped_uids(tmp_path: Path) -> None:
    deidentify = {"profile": "basic", "uid_secret_file": _key(tmp_path)}
    assert "destination[0].commitment: cannot go with [destination.deidentify]" in _error(
        tmp_path, commitment=True, deidentify=deidentify
    )
    kept = {"profile": "basic", "options": ["retain-uids"]}
    parse_config(_config(tmp_path, commitment=True, deidentify=kept), tmp_path / "c.toml")
