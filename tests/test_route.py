"""Routing rules: which storage targets and destinations an instance's jobs go to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from node.config.model import ConfigError, parse_config
from node.daemon import metrics
from node.ingest.intake import StoreRequest
from node.ingest.route import Router
from node.jobs.model import JobKind, JobSpec


def router(tmp_path: Path, routes: list[dict[str, Any]], **routing: str) -> Router:
    data: dict[str, Any] = {
        "storage": [
            {"name": "archive", "path": str(tmp_path / "a")},
            {"name": "quarantine", "path": str(tmp_path / "q")},
        ],
        "destination": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"name": "research", "ae_title": "RES", "host": "127.0.0.1", "port": 105},
        ],
        "route": routes,
    }
    if routing:
        data["routing"] = routing
    return Router(parse_config(data, tmp_path / "config.toml"))


def plan(router: Router, calling: str = "CT01", **header: str) -> list[JobSpec]:
    ds = Dataset()
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    request = StoreRequest(
        sop_class_uid=header.get("SOPClassUID", CTImageStorage),
        sop_instance_uid="1.2.3",
        transfer_syntax=ExplicitVRLittleEndian,
        calling_ae_title=calling,
        called_ae_title="DICOMNODE",
        dataset=b"",
    )
    return list(router.plan(ds, request))


STORE, FORWARD = JobKind.STORE, JobKind.FORWARD


def test_no_routes_means_everything_everywhere(tmp_path: Path) -> None:
    assert plan(router(tmp_path, []), Modality="OT") == [
        JobSpec(STORE, "archive"),
        JobSpec(STORE, "quarantine"),
        JobSpec(FORWARD, "pacs"),
        JobSpec(FORWARD, "research"),
    ]


def test_globs_on_keywords_and_calling_ae_title_all_must_match(tmp_path: Path) -> None:
    rules = router(
        tmp_path,
        [
            {"match": {"Modality": "CT", "CallingAETitle": "CT*"}, "destinations": ["pacs"]},
            {"match": {"SOPClassUID": MRImageStorage}, "storage": ["archive"]},
            {"match": {"StationName": "RES-?"}, "destinations": ["research"]},
        ],
    )
    assert plan(rules, "CT01", Modality="CT") == [JobSpec(FORWARD, "pacs")]
    assert plan(rules, "MR01", Modality="CT") == [JobSpec(STORE, "archive")]  # unrouted
    assert plan(rules, Modality="MR", SOPClassUID=MRImageStorage) == [JobSpec(STORE, "archive")]
    both = plan(rules, "CT9", Modality="CT", StationName="RES-1")
    assert both == [JobSpec(FORWARD, "pacs"), JobSpec(FORWARD, "research")]


def test_matching_is_case_sensitive_like_dicom_code_strings(tmp_path: Path) -> None:
    rules = router(tmp_path, [{"match": {"Modality": "CT"}, "destinations": ["pacs"]}])
    assert plan(rules, Modality="ct") == [JobSpec(STORE, "archive")]


def test_unmatched_goes_to_unrouted_storage_and_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules = router(
        tmp_path,
        [{"match": {"Modality": "CT"}, "destinations": ["pacs"]}],
        unrouted_storage="quarantine",
    )
    before = metrics.total(metrics.INSTANCES_UNROUTED, storage="quarantine")
    with caplog.at_level("WARNING", logger="node.route"):
        assert plan(rules, Modality="SR") == [JobSpec(STORE, "quarantine")]
    assert "matched no route" in caplog.text and "quarantine" in caplog.text
    assert metrics.total(metrics.INSTANCES_UNROUTED, storage="quarantine") == before + 1


def test_a_missing_attribute_matches_only_a_match_all_glob(tmp_path: Path) -> None:
    rules = router(
        tmp_path,
        [
            {"match": {"BodyPartExamined": "*"}, "destinations": ["research"]},
            {"match": {"BodyPartExamined": "?*"}, "destinations": ["pacs"]},
        ],
    )
    assert plan(rules, Modality="CT") == [JobSpec(FORWARD, "research")]


def test_route_naming_an_unknown_destination_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"route\[0\]\.destinations"):
        router(tmp_path, [{"match": {}, "destinations": ["nowhere"]}])


def test_routes_without_any_storage_for_unmatched_instances_are_refused(tmp_path: Path) -> None:
    destinations = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}]
    only_ct = {
        "destination": destinations,
        "route": [{"match": {"Modality": "CT"}, "destinations": ["pacs"]}],
    }
    with pytest.raises(ConfigError, match=r"routing\.unrouted_storage"):
        Router(parse_config(only_ct, tmp_path / "config.toml"))
    catch_all = {"destination": destinations, "route": [{"match": {}, "destinations": ["pacs"]}]}
    assert plan(Router(parse_config(catch_all, tmp_path / "config.toml"))) == [
        JobSpec(FORWARD, "pacs")
    ]
