"""Routing: which storage targets and destinations an instance goes to.

Rules match glob patterns against any DICOM keyword of the header, plus the
association's CallingAETitle and CalledAETitle. With no rules, everything goes
everywhere. An instance no rule matches is still kept, never dropped.

A route with trigger = "series" or "study" makes its jobs members of a group
(node.jobs.groups), sent when the group is stable. When several matching routes
name the same target, the first of them decides how its one job is sent.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.config.model import Config, ConfigError, RouteConfig
from node.daemon import metrics
from node.ingest.intake import StoreRequest
from node.jobs.model import GroupLevel, GroupMembership, GroupTrigger, JobKind, JobSpec

log = logging.getLogger("node.route")

ASSOCIATION_KEYS = ("CallingAETitle", "CalledAETitle")


def _value_of(key: str, header: Dataset, request: StoreRequest) -> str:
    if key == "CallingAETitle":
        return request.calling_ae_title
    if key == "CalledAETitle":
        return request.called_ae_title
    value = header.get(key)
    return "" if value is None else str(value)


def route_matches(route: RouteConfig, header: Dataset, request: StoreRequest) -> bool:
    # fnmatchcase: DICOM code strings are upper case, and "ct" must not match "CT".
    return all(
        fnmatch.fnmatchcase(_value_of(key, header, request), pattern)
        for key, pattern in route.match
    )


def group_trigger(route: RouteConfig, index: int) -> GroupTrigger | None:
    """The route's trigger as its groups record it; None for trigger = "instance"."""
    if route.trigger == "instance":
        return None
    return GroupTrigger(
        level=GroupLevel(route.trigger),
        route=route.name or f"route[{index}]",
        stable_after=route.stable_after,
        force_after=route.force_after,
        required_series=route.required_series,
    )


def _number(header: Dataset, keyword: str) -> int | None:
    """An IS/US/UL value as a whole number; None when absent or not a number."""
    value = header.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def group_membership(
    route: RouteConfig, trigger: GroupTrigger, header: Dataset, request: StoreRequest
) -> GroupMembership | None:
    """Which group of this route the instance joins; None if its header has no UIDs for it."""
    study = str(header.get("StudyInstanceUID", "") or "")
    series = str(header.get("SeriesInstanceUID", "") or "")
    if not study or (trigger.level == GroupLevel.SERIES and not series):
        log.warning(
            "SOP Instance UID %s from %r has no %s: sent on its own, not per %s (%s)",
            request.sop_instance_uid,
            request.calling_ae_title,
            "StudyInstanceUID" if not study else "SeriesInstanceUID",
            trigger.level,
            trigger.route,
        )
        return None
    expected = route.expected_instances
    if route.expected_instances_from:
        expected = _number(header, route.expected_instances_from) or 0
    return GroupMembership(
        trigger=trigger,
        study_instance_uid=study,
        series_instance_uid=series if trigger.level == GroupLevel.SERIES else "",
        member_series_uid=series,
        series_number=_number(header, "SeriesNumber"),
        instance_number=_number(header, "InstanceNumber"),
        series_description=str(header.get("SeriesDescription", "") or ""),
        expected_instances=max(0, expected),
    )


class Router:
    def __init__(self, config: Config) -> None:
        self.routes = config.routes
        self.triggers = [group_trigger(route, i) for i, route in enumerate(self.routes)]
        self.all_jobs = [JobSpec(JobKind.STORE, s.name) for s in config.storage] + [
            JobSpec(JobKind.FORWARD, d.name) for d in config.destinations
        ]
        fallback = config.unrouted_storage or (config.storage[0].name if config.storage else None)
        self.unrouted_jobs = [JobSpec(JobKind.STORE, fallback)] if fallback else []
        catch_all = any(not route.match for route in self.routes)
        if self.routes and not fallback and not catch_all:
            # An unmatched instance would have no job at all: acknowledged, then never seen again.
            raise ConfigError(
                config.source,
                "routing.unrouted_storage",
                "routes are configured but there is no [[storage]] to keep instances that match"
                " none of them: add a storage target, or a catch-all route (match = {})",
            )

    def plan(self, header: Dataset, request: StoreRequest) -> Sequence[JobSpec]:
        if not self.routes:
            return self.all_jobs
        # A dict keeps the first of equal keys: JobSpec equality leaves the group out.
        jobs: dict[JobSpec, None] = {}
        for route, trigger in zip(self.routes, self.triggers, strict=True):
            if route_matches(route, header, request):
                group = (
                    None if trigger is None else group_membership(route, trigger, header, request)
                )
                jobs.update(
                    dict.fromkeys(JobSpec(JobKind.STORE, name, group) for name in route.storage)
                )
                jobs.update(
                    dict.fromkeys(
                        JobSpec(JobKind.FORWARD, name, group) for name in route.destinations
                    )
                )
        if jobs:
            return list(jobs)
        if self.unrouted_jobs:
            metrics.record_unrouted(self.unrouted_jobs[0].target)
        log.warning(
            "SOP Instance UID %s (%s, Modality %s, from %r) matched no route: kept in storage %r",
            request.sop_instance_uid,
            UID(request.sop_class_uid).name,
            header.get("Modality", "none"),
            request.calling_ae_title,
            self.unrouted_jobs[0].target if self.unrouted_jobs else None,
        )
        return self.unrouted_jobs
