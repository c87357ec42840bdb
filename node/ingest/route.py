"""Routing: which storage targets and destinations an instance goes to.

Rules match glob patterns against any DICOM keyword of the header, plus the
association's CallingAETitle and CalledAETitle. With no rules, everything goes
everywhere. An instance no rule matches is still kept, never dropped.
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
from node.jobs.model import JobKind, JobSpec

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


class Router:
    def __init__(self, config: Config) -> None:
        self.routes = config.routes
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
        jobs: dict[JobSpec, None] = {}
        for route in self.routes:
            if route_matches(route, header, request):
                jobs.update(dict.fromkeys(JobSpec(JobKind.STORE, name) for name in route.storage))
                jobs.update(
                    dict.fromkeys(JobSpec(JobKind.FORWARD, name) for name in route.destinations)
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
