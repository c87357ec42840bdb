"""Storage Commitment against pynetdicom peers: every Failed SOP Sequence case, both report
paths (the requesting association, a new one with role selection), and the SCU side's
report timeout. One node for the module; each test uses its own calling AE and instances."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.commitment.peers import (
    Modality,
    ReportingDestination,
    ReportReceiver,
    SilentDestination,
    action_dataset,
    references,
)
from tests.corpus import CT_SMALL, copies_with_new_uids
from tests.support import NodeProcess, configured_node, dicom_node, free_port, wait_until

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
REPORT_TIMEOUT = 3


@pytest.fixture(scope="module")
def peers() -> Iterator[tuple[ReportReceiver, SilentDestination]]:
    receiver = ReportReceiver("LEAVER").start()
    silent = SilentDestination("SILENT").start()
    yield receiver, silent
    receiver.stop()
    silent.stop()


@pytest.fixture(scope="module")
def reporter() -> Iterator[ReportingDestination]:
    destination = ReportingDestination("REPORTER").start()
    yield destination
    destination.stop()


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory,
    peers: tuple[ReportReceiver, SilentDestination],
    reporter: ReportingDestination,
) -> Iterator[NodeProcess]:
    receiver, silent = peers
    down_port = free_port()  # nothing listens there
    metrics_port = free_port()

    def edit(sections: dict[str, object]) -> None:
        sections["destination"] = [
            {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": down_port},
            {
                "name": "silent",
                "ae_title": silent.ae_title,
                "host": "127.0.0.1",
                "port": silent.port,
                "commitment": True,
                "retry": {"initial_delay": 0.5, "max_delay": 0.5, "max_attempts": 2},
            },
            {
                "name": "reporter",
                "ae_title": reporter.ae_title,
                "host": "127.0.0.1",
                "port": reporter.port,
                "commitment": True,
                "idle_timeout": 30,
            },
        ]
        sections["route"] = [
            {
                "match": {"CallingAETitle": "TIMEOUT*"},
                "storage": ["archive"],
                "destinations": ["down"],
            },
            {"match": {"CallingAETitle": "SILENT*"}, "destinations": ["silent"]},
            {"match": {"CallingAETitle": "SAMEASSOC"}, "destinations": ["reporter"]},
            {"match": {"CallingAETitle": "MOD*"}, "storage": ["archive"]},
            {"match": {"CallingAETitle": "LEAVER"}, "storage": ["archive"]},
        ]
        sections["metrics"] = {"address": f"127.0.0.1:{metrics_port}"}
        sections["commitment"] = {
            "enabled": True,
            "when": "delivered",
            "report_timeout": REPORT_TIMEOUT,
            "requestor": [
                {"ae_title": receiver.ae_title, "host": "127.0.0.1", "port": receiver.port}
            ],
        }

    process = configured_node(tmp_path_factory.mktemp("commitment"), edit).start()
    process.metrics_port = metrics_port  # type: ignore[attr-defined]
    yield process
    process.kill()


def _log(node: NodeProcess) -> str:
    return node.log_path.read_text()


def test_report_on_the_requesting_association_names_the_unknown_instance(
    node: NodeProcess, tmp_path: Path
) -> None:
    files = copies_with_new_uids(CT_SMALL, tmp_path, 3)
    modality = Modality(node.port, "MODALITY")
    refs = references(files, [(CT_IMAGE_STORAGE, "1.2.999.1.never.sent")])
    status = modality.send_and_request(files, "2.25.1001", refs, wait_for_report=20)
    assert status == 0x0000
    assert len(modality.reports) == 1, _log(node)
    report = modality.reports[0]
    assert report.transaction_uid == "2.25.1001"
    assert report.event_type_id == 2
    assert sorted(report.committed) == sorted(uid for _cls, uid in refs[:3])
    assert report.failed == {"1.2.999.1.never.sent": 0x0112}
    # The node logs the delivery once it has the N-EVENT-REPORT-RSP and has closed the record.
    assert node.logged(
        "Transaction UID 2.25.1001 delivered to 'MODALITY' on its association", 30
    ), _log(node)


def test_all_committed_is_event_type_1(node: NodeProcess, tmp_path: Path) -> None:
    files = copies_with_new_uids(CT_SMALL, tmp_path, 2)
    modality = Modality(node.port, "MODALL")
    refs = references(files)
    assert modality.send_and_request(files, "2.25.1002", refs, wait_for_report=20) == 0x0000
    assert [(r.event_type_id, sorted(r.committed), r.failed) for r in modality.reports] == [
        (1, sorted(uid for _cls, uid in refs), {})
    ]


def test_a_sop_class_that_does_not_match_fails_with_0119(node: NodeProcess, tmp_path: Path) -> None:
    files = copies_with_new_uids(CT_SMALL, tmp_path, 2)
    modality = Modality(node.port, "MODCLASS")
    (_, first), (_, second) = references(files)
    refs = [(MR_IMAGE_STORAGE, first), (CT_IMAGE_STORAGE, second)]
    assert modality.send_and_request(files, "2.25.1003", refs, wait_for_report=20) == 0x0000
    assert [(r.committed, r.failed) for r in modality.reports] == [((second,), {first: 0x0119})]


def test_an_instance_not_there_by_the_report_timeout_fails_with_0110(
    node: NodeProcess, tmp_path: Path
) -> None:
    # Routed to a destination that is down: with when = "delivered" it never gets there.
    files = copies_with_new_uids(CT_SMALL, tmp_path, 1)
    modality = Modality(node.port, "TIMEOUTSCU")
    refs = references(files)
    started = time.monotonic()
    modality.send_and_request(files, "2.25.1004", refs, wait_for_report=REPORT_TIMEOUT + 20)
    waited = time.monotonic() - started
    assert [(r.committed, r.failed) for r in modality.reports] == [((), {refs[0][1]: 0x0110})]
    assert waited >= REPORT_TIMEOUT - 0.5  # not before the timeout: it was still on its way


def test_report_goes_over_a_new_association_with_role_selection_when_the_first_refuses_it(
    node: NodeProcess, peers: tuple[ReportReceiver, SilentDestination], tmp_path: Path
) -> None:
    receiver, _silent = peers
    files = copies_with_new_uids(CT_SMALL, tmp_path, 2)
    modality = Modality(node.port, receiver.ae_title)
    refs = references(files)
    status = modality.send_and_request(
        files, "2.25.1005", refs, wait_for_report=1, take_reports=False
    )
    assert status == 0x0000
    reports = [r for r in receiver.wait(1, timeout=30) if r.transaction_uid == "2.25.1005"]
    assert [(r.event_type_id, sorted(r.committed), r.calling_ae_title) for r in reports] == [
        (1, sorted(uid for _cls, uid in refs), "DICOMNODE")
    ], _log(node)
    assert node.logged("Transaction UID 2.25.1005 delivered to 'LEAVER' on a new association", 30)


def test_a_request_without_transaction_uid_is_refused(node: NodeProcess) -> None:
    dataset = action_dataset("2.25.1", [(CT_IMAGE_STORAGE, "1.2.3")])
    del dataset.TransactionUID
    status = Modality(node.port, "MODBAD").send_and_request([], "", [], dataset=dataset)
    assert status == 0x0110
    assert "Transaction UID (0008,1195) is missing" in _log(node)


def test_no_report_from_a_destination_sends_again_then_dead_letters(
    node: NodeProcess, peers: tuple[ReportReceiver, SilentDestination], tmp_path: Path
) -> None:
    _receiver, silent = peers
    files = copies_with_new_uids(CT_SMALL, tmp_path, 1)
    uid = references(files)[0][1]
    modality = Modality(node.port, "SILENTSCU")
    modality.send_and_request(files, "2.25.1006", references(files))
    # While the report is awaited the instance stays in the queue and the spool.
    assert wait_until(lambda: len(silent.actions) >= 1, timeout=20)
    status = dicom_node("queue", "-c", str(node.config_path), "status")
    assert re.search(r"sent\s+silent\s+1\s+1", status.stdout), status.stdout
    assert re.search(
        r"forward\s+silent\s+pending\s+1 .*awaiting the storage commitment report", status.stdout
    ), status.stdout
    spool = node.config_path.parent / "data" / "spool"
    assert any(uid.encode() in p.read_bytes() for p in spool.rglob("*.dcm"))
    assert wait_until(lambda: "dead letter: SOP Instance UID " + uid in _log(node), timeout=40)
    assert silent.stored.count(uid) == 2  # sent, no report, sent again, no report: given up
    assert len(silent.actions) >= 2
    assert re.search(
        rf"dead letter: SOP Instance UID {uid} for 'silent': gave up after 2 attempts: no storage"
        rf" commitment report from 'silent' within {REPORT_TIMEOUT} s",
        _log(node),
    ), _log(node)


def test_a_destination_may_report_on_our_association_while_it_idles(
    node: NodeProcess, reporter: ReportingDestination, tmp_path: Path
) -> None:
    files = copies_with_new_uids(CT_SMALL, tmp_path, 2)
    uids = [uid for _cls, uid in references(files)]
    Modality(node.port, "SAMEASSOC").send_and_request(files, "2.25.1007", references(files))

    def committed() -> bool:
        log = _log(node)
        return all(
            f"forwarded SOP Instance UID {uid} to 'reporter': committed by" in log for uid in uids
        )

    assert wait_until(committed, timeout=30), _log(node)
    assert reporter.statuses and set(reporter.statuses) == {0x0000}
    assert re.search(r"storage commitment report from 'REPORTER' for Transaction UID", _log(node))


def test_metrics_count_requests_reports_failures_and_time(node: NodeProcess) -> None:
    # Runs last in the module: the requests above have been made and reported.
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics") as response:  # type: ignore[attr-defined]
        text = response.read().decode()

    def value(sample: str) -> float:
        found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    assert value('dicom_node_commitment_requests_total{direction="received"}') >= 6
    assert value('dicom_node_commitment_requests_total{direction="sent"}') >= 3
    assert value('dicom_node_commitment_reports_total{direction="sent",outcome="failures"}') >= 3
    assert value('dicom_node_commitment_reports_total{direction="sent",outcome="committed"}') >= 2
    assert (
        value('dicom_node_commitment_failed_instances_total{direction="sent",reason="0x0112"}') >= 1
    )
    assert (
        value('dicom_node_commitment_failed_instances_total{direction="sent",reason="0x0119"}') >= 1
    )
    assert value('dicom_node_commitment_reports_total{direction="received",outcome="retry"}') >= 2
    assert value('dicom_node_commitment_report_seconds_count{direction="sent"}') >= 5
