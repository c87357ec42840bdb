"""Route triggers in the config, and what routing makes of them: bad keys are errors naming
the key; a triggered route's jobs carry the group their instance joins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node.config.model import ConfigError, parse_config
from node.jobs.model import GroupLevel, JobKind, JobSpec
from tests.config.test_foundation_config import CONFIG_ERROR, check_config
from tests.ingest.test_route import plan, router
from tests.support import base_config, write_config

MR = {"match": {"Modality": "MR"}, "destinations": ["pacs"]}


def load(tmp_path: Path, route: dict[str, Any]) -> None:
    data = {
        "storage": [{"name": "archive", "path": str(tmp_path / "a")}],
        "destination": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        "route": [{**MR, **route}],
    }
    parse_config(data, tmp_path / "config.toml")


BAD = {
    "a trigger without stable_after": (
        {"trigger": "series"},
        "route[0].stable_after",
        'trigger = "series" needs stable_after',
    ),
    "force_after below stable_after": (
        {"trigger": "study", "stable_after": 900, "force_after": 60},
        "route[0].force_after",
        "must be >= stable_after (900), or 0 for never; got 60",
    ),
    "an unknown trigger": ({"trigger": "patient"}, "route[0].trigger", "must be one of"),
    "stable_after on an instance route": (
        {"stable_after": 30},
        "route[0].stable_after",
        'applies only with trigger = "series" or "study"',
    ),
    "a condition without force_after": (
        {"trigger": "series", "stable_after": 30, "expected_instances": 20},
        "route[0].force_after",
        "expected_instances needs force_after",
    ),
    "required_series on a series route": (
        {"trigger": "series", "stable_after": 30, "force_after": 60, "required_series": ["T1*"]},
        "route[0].required_series",
        'applies only with trigger = "study"',
    ),
    "a count from a non-number attribute": (
        {
            "trigger": "series",
            "stable_after": 30,
            "force_after": 60,
            "expected_instances_from": "SeriesDescription",
        },
        "route[0].expected_instances_from",
        "holding a number of instances",
    ),
    "both counts": (
        {
            "trigger": "series",
            "stable_after": 30,
            "force_after": 60,
            "expected_instances": 3,
            "expected_instances_from": "NumberOfSeriesRelatedInstances",
        },
        "route[0].expected_instances_from",
        "not both",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_trigger_is_an_error_naming_the_key(tmp_path: Path, case: str) -> None:
    route, key, message = BAD[case]
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, route)
    assert raised.value.key == key
    assert message in raised.value.message


def test_check_config_names_the_file_and_the_key_of_a_trigger_without_stable_after(
    tmp_path: Path,
) -> None:
    sections = base_config(tmp_path, 11112)
    sections["route"] = [{"match": {"Modality": "MR"}, "storage": ["archive"], "trigger": "study"}]
    config = write_config(tmp_path / "broken.toml", sections)
    result = check_config(config)
    assert result.returncode == CONFIG_ERROR, result.stdout + result.stderr
    assert f"{config}: route[0].stable_after: " in result.stderr, result.stderr


def test_a_good_trigger_loads(tmp_path: Path) -> None:
    load(
        tmp_path,
        {
            "trigger": "study",
            "stable_after": 30,
            "force_after": 3600,
            "required_series": ["T1*", "T2*"],
        },
    )


SERIES_ROUTE = {
    "name": "mr-to-ai",
    "match": {"Modality": "MR"},
    "storage": ["archive"],
    "destinations": ["pacs"],
    "trigger": "series",
    "stable_after": 30,
    "force_after": 600,
    "expected_instances_from": "NumberOfSeriesRelatedInstances",
}
HEADER = {
    "Modality": "MR",
    "StudyInstanceUID": "1.2.3",
    "SeriesInstanceUID": "1.2.3.4",
    "SeriesNumber": "7",
    "InstanceNumber": "12",
    "SeriesDescription": "T1 AX",
    "NumberOfSeriesRelatedInstances": "40",
}


def test_a_series_route_puts_its_jobs_in_the_series_group(tmp_path: Path) -> None:
    jobs = plan(router(tmp_path, [SERIES_ROUTE]), **HEADER)
    assert jobs == [JobSpec(JobKind.STORE, "archive"), JobSpec(JobKind.FORWARD, "pacs")]
    for job in jobs:
        group = job.group
        assert group is not None
        assert group.trigger.level == GroupLevel.SERIES and group.trigger.route == "mr-to-ai"
        assert (group.trigger.stable_after, group.trigger.force_after) == (30.0, 600.0)
        assert (group.study_instance_uid, group.series_instance_uid) == ("1.2.3", "1.2.3.4")
        assert (group.series_number, group.instance_number) == (7, 12)
        assert (group.series_description, group.expected_instances) == ("T1 AX", 40)


def test_a_study_route_groups_by_study_and_the_first_matching_route_decides(
    tmp_path: Path,
) -> None:
    study = {"match": {"Modality": "MR"}, "destinations": ["pacs"], "trigger": "study"}
    instance = {"match": {}, "destinations": ["pacs", "research"]}
    routes = [{**study, "stable_after": 900}, instance]
    (pacs, research) = plan(router(tmp_path, routes), **HEADER)
    assert pacs.target == "pacs" and pacs.group is not None
    assert pacs.group.trigger.level == GroupLevel.STUDY and pacs.group.trigger.route == "route[0]"
    assert (pacs.group.series_instance_uid, pacs.group.member_series_uid) == ("", "1.2.3.4")
    assert research.target == "research" and research.group is None
    (pacs_first,) = plan(router(tmp_path, [instance, {**study, "stable_after": 900}]), **HEADER)[:1]
    assert pacs_first.group is None  # the instance route came first


def test_an_instance_without_its_series_uid_is_sent_on_its_own(tmp_path: Path) -> None:
    header = {k: v for k, v in HEADER.items() if k != "SeriesInstanceUID"}
    jobs = plan(router(tmp_path, [SERIES_ROUTE]), **header)
    assert [job.group for job in jobs] == [None, None]  # never lost, never stuck waiting
