"""Prometheus metrics: every counter the node keeps, and the HTTP endpoint that exports them.

Each stage records what it did with one call (`metrics.record_received(...)`,
`metrics.record_stored(...)`, `metrics.record_forwarded(...)`, ...). The queue
depth is not counted here but read from the database at scrape time by
QueueCollector, so it is right even after a restart. The endpoint is off unless
`[metrics] address` is set; "127.0.0.1:9110" keeps it on loopback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from node.jobs.interface import QueueReports
from node.jobs.model import JobState
from node.web.activity import AssociationRecord, DeliveryDelays, RecentAssociations
from node.web.traffic import Flow, TrafficRing

log = logging.getLogger("node.metrics")

# One series per counter: the *_created timestamps only double the scrape.
disable_created_metrics()

ASSOCIATIONS_ACCEPTED = Counter(
    "dicom_node_associations_accepted", "Associations accepted from peers"
)
ASSOCIATIONS_REJECTED = Counter(
    "dicom_node_associations_rejected", "Associations rejected, by reason", ["reason"]
)
ASSOCIATIONS_ABORTED = Counter(
    "dicom_node_associations_aborted", "Accepted associations that ended in an abort"
)
ASSOCIATIONS_ACTIVE = Gauge("dicom_node_associations_active", "Associations open right now")
INSTANCES_RECEIVED = Counter(
    "dicom_node_instances_received",
    "C-STORE requests answered, by the status returned (success means durably queued)",
    ["status"],
)
INSTANCES_STORED = Counter(
    "dicom_node_instances_stored",
    "Store jobs finished, by storage and status (stored, retry, failed)",
    ["storage", "status"],
)
INSTANCES_FORWARDED = Counter(
    "dicom_node_instances_forwarded",
    "Forward jobs finished, by destination and status (success, warning, retry, failed)",
    ["destination", "status"],
)
INSTANCES_UNROUTED = Counter(
    "dicom_node_instances_unrouted",
    "Instances that matched no [[route]], by the storage that keeps them",
    ["storage"],
)
RECEIVED_BYTES = Counter("dicom_node_received_bytes", "Dataset bytes accepted from peers")
STORED_BYTES = Counter("dicom_node_stored_bytes", "File bytes written to storage", ["storage"])
SENT_BYTES = Counter("dicom_node_sent_bytes", "Dataset bytes forwarded", ["destination"])
TRANSCODE_SECONDS = Histogram(
    "dicom_node_transcode_duration_seconds",
    "Time to transcode (encode and verify) one instance, by requested transfer syntax",
    ["target"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
TRANSCODE_FALLBACKS = Counter(
    "dicom_node_transcode_fallbacks",
    "Instances written in a fallback syntax because the requested one failed or did not verify",
    ["target"],
)
VERIFICATION_MISMATCHES = Counter(
    "dicom_node_transcode_verification_mismatches",
    "Encodes whose decoded pixels differed from the source (codec bugs; never written)",
    ["target"],
)

GROUP_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0)
GROUP_DISPATCH_SECONDS = Histogram(
    "dicom_node_group_dispatch_delay_seconds",
    "Series and study groups: seconds from the first arrival to the dispatch, observed at"
    " delivery, by kind and target",
    ["kind", "target"],
    buckets=GROUP_BUCKETS,
)
GROUP_DELIVERY_SECONDS = Histogram(
    "dicom_node_group_delivery_seconds",
    "Series and study groups: seconds from the first arrival until every member was delivered",
    ["kind", "target"],
    buckets=GROUP_BUCKETS,
)

DELIVERY_DELAY = Histogram(
    "dicom_node_forward_delivery_delay_seconds",
    "Time from the C-STORE success to the sender to delivery at a destination",
    ["destination"],
    buckets=(0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0),
)

# The status page's memory (node.web): per-minute traffic over the last hour, the newest
# associations and delivery delays. Fed by the record_* functions below, with the counters.
TRAFFIC = TrafficRing()
RECENT_ASSOCIATIONS = RecentAssociations()
DELIVERY_DELAYS = DeliveryDelays()

# The transcode ladder explains each failed rung; this phrase marks a pixel mismatch.
MISMATCH_MARK = "verification mismatch"


def record_association_accepted() -> None:
    ASSOCIATIONS_ACCEPTED.inc()
    ASSOCIATIONS_ACTIVE.inc()


def record_association_closed(aborted: bool) -> None:
    ASSOCIATIONS_ACTIVE.dec()
    if aborted:
        ASSOCIATIONS_ABORTED.inc()


def record_association_rejected(reason: str) -> None:
    ASSOCIATIONS_REJECTED.labels(reason).inc()


def record_received(status: str, size: int) -> None:
    """One answered C-STORE; `status` is the intake Status name in lower case."""
    INSTANCES_RECEIVED.labels(status).inc()
    if status == "success":
        RECEIVED_BYTES.inc(size)
    TRAFFIC.add(Flow.RECEIVED if status == "success" else Flow.REFUSED, size)


def record_stored(storage: str, status: str, size: int = 0) -> None:
    """One store job outcome: status is 'stored', 'retry' or 'failed'; size is the file written."""
    INSTANCES_STORED.labels(storage, status).inc()
    if size:
        STORED_BYTES.labels(storage).inc(size)
    if status == "stored":
        TRAFFIC.add(Flow.STORED, size)


def record_forwarded(destination: str, status: str, size: int = 0) -> None:
    """One forward job outcome: status is 'success', 'warning', 'retry' or 'failed'; size is sent."""
    INSTANCES_FORWARDED.labels(destination, status).inc()
    if size:
        SENT_BYTES.labels(destination).inc(size)
    if status in ("success", "warning"):
        TRAFFIC.add(Flow.FORWARDED, size)


def record_delivery_delay(destination: str, received_at: float | None) -> None:
    """One delivered instance, acknowledged to its sender at `received_at` (epoch seconds)."""
    if received_at is None:
        return
    seconds = max(0.0, time.time() - received_at)
    DELIVERY_DELAY.labels(destination).observe(seconds)
    DELIVERY_DELAYS.add(destination, seconds)


def record_association_ended(record: AssociationRecord) -> None:
    """An association from a peer ended or was refused: kept for the status page."""
    RECENT_ASSOCIATIONS.add(record)


def record_unrouted(storage: str) -> None:
    """One instance that matched no route, kept in `storage` (routing.unrouted_storage)."""
    INSTANCES_UNROUTED.labels(storage).inc()


def record_transcode(target: str, seconds: float, fallback: bool, reasons: Sequence[str]) -> None:
    """One transcode (an Outcome's fallback and reasons), labelled by the requested syntax name."""
    TRANSCODE_SECONDS.labels(target).observe(seconds)
    if fallback:
        TRANSCODE_FALLBACKS.labels(target).inc()
    mismatches = sum(MISMATCH_MARK in reason for reason in reasons)
    if mismatches:
        VERIFICATION_MISMATCHES.labels(target).inc(mismatches)


def record_group_delivered(kind: str, target: str, waited: float, took: float) -> None:
    """A series or study group delivered: first arrival to dispatch, and to delivery."""
    GROUP_DISPATCH_SECONDS.labels(kind, target).observe(max(0.0, waited))
    GROUP_DELIVERY_SECONDS.labels(kind, target).observe(max(0.0, took))


def group_families(reports: QueueReports) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Groups waiting (or held), and late arrivals, read from the queue at scrape."""
    waiting = GaugeMetricFamily(
        "dicom_node_groups_waiting",
        "Series and study groups not yet dispatched, by kind, target and state (waiting, held)",
        labels=["kind", "target", "state"],
    )
    counts: dict[tuple[str, str, str], int] = {}
    for group in reports.waiting_groups():
        key = (group.kind, group.target, group.state)
        counts[key] = counts.get(key, 0) + 1
    for key, count in sorted(counts.items()):
        waiting.add_metric(list(key), count)
    totals = reports.group_totals()
    late = CounterMetricFamily(
        "dicom_node_group_late_arrivals",
        "Instances that arrived for a group already dispatched (each starts or joins a new"
        " version of it); kept in the queue database, so it survives restarts",
    )
    late.add_metric([], totals.late_arrivals)
    yield waiting
    yield late


def total(metric: Counter | Gauge, **labels: str) -> float:
    """Sum of a metric's current values over the label values given (all when none)."""
    value = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                value += sample.value
    return value


class QueueCollector(Collector):
    """Queue depth by kind, target and state, and the oldest pending job's age, read at scrape."""

    def __init__(self, reports: QueueReports) -> None:
        self.reports = reports

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        depth = GaugeMetricFamily(
            "dicom_node_queue_jobs",
            "Jobs in the queue, by kind (store, forward), target and state",
            labels=["kind", "target", "state"],
        )
        oldest = GaugeMetricFamily(
            "dicom_node_queue_oldest_pending_age_seconds",
            "Age of the oldest pending job, by kind and target",
            labels=["kind", "target"],
        )
        now = time.time()
        for row in self.reports.report():
            depth.add_metric([row.kind, row.target, row.state], row.count)
            if row.state == JobState.PENDING and row.oldest_created_at is not None:
                oldest.add_metric([row.kind, row.target], max(0.0, now - row.oldest_created_at))
        yield depth
        yield oldest
        yield from group_families(self.reports)


@dataclass
class MetricsEndpoint:
    """The running HTTP exporter; close() stops it and forgets the queue collector."""

    server: WSGIServer | None
    thread: threading.Thread | None
    collector: QueueCollector

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        REGISTRY.unregister(self.collector)


def parse_address(address: str) -> tuple[str, int]:
    """'127.0.0.1:9110', '[::1]:9110' or ':9110' (all interfaces) into host and port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def start_metrics(address: str, reports: QueueReports) -> MetricsEndpoint:
    """Register the queue collector and, if an address is configured, serve /metrics on it."""
    collector = QueueCollector(reports)
    REGISTRY.register(collector)
    if not address:
        return MetricsEndpoint(None, None, collector)
    host, port = parse_address(address)
    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as exc:
        REGISTRY.unregister(collector)
        raise OSError(
            f"cannot serve metrics on {address}: {exc} (change or empty [metrics] address)"
        ) from exc
    log.info("metrics on http://%s/metrics", address)
    return MetricsEndpoint(server, thread, collector)
