"""Prometheus metrics: scraped from a running node after real transfers, checked by value."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from node.daemon import metrics
from node.jobs.jobqueue import SqliteJobQueue
from node.jobs.model import JobKind, JobSpec
from node.jobs.reports import SqliteQueueOperations
from tests.conftest import StartNode
from tests.corpus import CT_SMALL, copies_with_new_uids, dataset_bytes
from tests.support import (
    free_port,
    storescu,
    wait_until,
)
from tests.test_daemon_status import queued_instance

N = 3

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counters_after_n_instances_and_a_rejected_association(
    start_node: StartNode, tmp_path: Path
) -> None:
    metrics_port = free_port()
    files = copies_with_new_uids(CT_SMALL, tmp_path / "send", N)
    sections = {
        "security": {"allowed_calling_aets": ["STORESCU"]},
        "metrics": {"address": f"127.0.0.1:{metrics_port}"},
    }
    # journald mode: the log lines are checked below too.
    node = start_node(lambda config: config.update(sections), env={"JOURNAL_STREAM": "8:4242"})
    port = node.port
    try:
        sent = storescu(port, files)  # one association
        assert sent.returncode == 0, sent.stderr
        refused = storescu(port, files[:1], aet="INTRUDER")
        assert refused.returncode != 0
        stored = "dicom_node_instances_stored_total"
        assert wait_until(
            lambda: value(scrape(metrics_port), stored, storage="archive", status="stored") == N,
            timeout=20,
        ), node.log()
        samples = scrape(metrics_port)
    finally:
        assert node.stop() == 0, node.log()

    archive = list((tmp_path / "archive").rglob("*.dcm"))
    assert len(archive) == N
    assert value(samples, "dicom_node_associations_accepted_total") == 1
    assert (
        value(samples, "dicom_node_associations_rejected_total", reason="calling_ae_not_allowed")
        == 1
    )
    assert value(samples, "dicom_node_associations_active") == 0
    assert value(samples, "dicom_node_instances_received_total", status="success") == N
    # Stored as received (no transcoding configured): the archive files hold the received bytes.
    assert value(samples, "dicom_node_received_bytes_total") == sum(
        len(dataset_bytes(f)) for f in archive
    )
    assert value(samples, "dicom_node_stored_bytes_total", storage="archive") == sum(
        f.stat().st_size for f in archive
    )
    assert value(samples, stored, storage="archive", status="retry") == 0
    # Finished jobs leave the queue, so its depth is empty again.
    assert not [key for key in samples if key[0] == "dicom_node_queue_jobs"]

    lines = node.log().splitlines()
    assert lines and all(re.match(r"<[0-7]>node\.", line) for line in lines), lines
    assert not [line for line in lines if re.search(r"\d\d:\d\d:\d\d", line)], "timestamps"
    association = [line for line in lines if "association released" in line]
    assert len(association) == 1 and association[0].startswith("<6>node.scp: ")
    assert "'STORESCU' -> 'DICOMNODE', " in association[0]
    assert f", {N} instances received" in association[0]
    rejections = [line for line in lines if "'INTRUDER'" in line]
    assert len(rejections) == 1 and rejections[0].startswith("<4>"), rejections


def test_queue_collector_reports_depth_by_state_and_oldest_age(tmp_path: Path) -> None:
    queue = SqliteJobQueue.open(tmp_path / "queue.sqlite3")
    jobs = [JobSpec(JobKind.STORE, "archive"), JobSpec(JobKind.FORWARD, "pacs")]
    for _ in range(3):
        queue.record_instance(queued_instance(tmp_path, generate_uid(), 100), jobs)
    time.sleep(0.2)
    queue.claim(JobKind.FORWARD, target="pacs", limit=1)
    endpoint = metrics.start_metrics("", SqliteQueueOperations(queue.database))
    try:
        get = REGISTRY.get_sample_value
        assert (
            get("dicom_node_queue_jobs", {"kind": "store", "target": "archive", "state": "pending"})
            == 3
        )
        assert (
            get("dicom_node_queue_jobs", {"kind": "forward", "target": "pacs", "state": "pending"})
            == 2
        )
        assert (
            get("dicom_node_queue_jobs", {"kind": "forward", "target": "pacs", "state": "running"})
            == 1
        )
        age = get(
            "dicom_node_queue_oldest_pending_age_seconds", {"kind": "store", "target": "archive"}
        )
        assert age is not None and 0.2 <= age < 60
    finally:
        endpoint.close()
        queue.close()
    assert (
        REGISTRY.get_sample_value(
            "dicom_node_queue_jobs", {"kind": "store", "target": "archive", "state": "pending"}
        )
        is None
    )


def test_transcode_records_duration_fallback_and_mismatch() -> None:
    get = REGISTRY.get_sample_value
    labels = {"target": "TestOnlySyntax"}
    metrics.record_transcode("TestOnlySyntax", 0.2, False, [])
    metrics.record_transcode(
        "TestOnlySyntax",
        0.4,
        True,
        ["TestOnlySyntax: verification mismatch: decoded pixels differ from source"],
    )
    assert get("dicom_node_transcode_duration_seconds_count", labels) == 2
    assert abs((get("dicom_node_transcode_duration_seconds_sum", labels) or 0) - 0.6) < 1e-9
    assert get("dicom_node_transcode_fallbacks_total", labels) == 1
    assert get("dicom_node_transcode_verification_mismatches_total", labels) == 1


def test_forwarded_counts_by_destination_and_status_with_bytes_out() -> None:
    get = REGISTRY.get_sample_value
    metrics.record_forwarded("test-pacs", "success", 1000)
    metrics.record_forwarded("test-pacs", "success", 500)
    metrics.record_forwarded("test-pacs", "retry")
    assert (
        get(
            "dicom_node_instances_forwarded_total",
            {"destination": "test-pacs", "status": "success"},
        )
        == 2
    )
    assert (
        get("dicom_node_instances_forwarded_total", {"destination": "test-pacs", "status": "retry"})
        == 1
    )
    assert get("dicom_node_sent_bytes_total", {"destination": "test-pacs"}) == 1500
