"""Storage Commitment metrics, on the node's one Prometheus registry (see node.daemon.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "dicom_node_commitment_requests",
    "Storage Commitment requests: received from peers, or sent to destinations",
    ["direction"],
)
REPORTS = Counter(
    "dicom_node_commitment_reports",
    "Storage Commitment reports delivered to requestors (sent) or applied from destinations"
    " (received), by outcome (committed, failures) and retries of undelivered ones",
    ["direction", "outcome"],
)
FAILED_INSTANCES = Counter(
    "dicom_node_commitment_failed_instances",
    "Instances a report named as failed, by direction and Failure Reason",
    ["direction", "reason"],
)
REPORT_SECONDS = Histogram(
    "dicom_node_commitment_report_seconds",
    "Time from a Storage Commitment request to its report, by direction",
    ["direction"],
    buckets=(0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0),
)


def record_request(direction: str) -> None:
    REQUESTS.labels(direction).inc()


def record_report(direction: str, failed: list[int], seconds: float) -> None:
    """A report delivered (direction 'sent') or received and applied ('received')."""
    REPORTS.labels(direction, "failures" if failed else "committed").inc()
    for reason in failed:
        FAILED_INSTANCES.labels(direction, f"0x{reason:04X}").inc()
    REPORT_SECONDS.labels(direction).observe(max(0.0, seconds))


def record_report_retry(direction: str) -> None:
    REPORTS.labels(direction, "retry").inc()
