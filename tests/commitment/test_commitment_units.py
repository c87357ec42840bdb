"""Storage Commitment in pieces, without processes: command sets, data sets, the `when`
evaluator, negotiation with role selection, and the records with the finished history."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context

from node.commitment.evaluator import outcome
from node.commitment.messages import (
    COMMITMENT_SYNTAXES,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    CommitmentMessageError,
    CommitmentReport,
    CommitmentRequest,
    Failure,
    Reference,
    decode_report,
    decode_request,
    encode_report,
    encode_request,
)
from node.ingest.scp import StorageNegotiation
from node.jobs.commitments import (
    COMMITTED,
    CommitmentItem,
    Direction,
    InstanceProgress,
    NewCommitment,
    SqliteCommitments,
)
from node.jobs.database import Database
from node.jobs.jobqueue import SqliteJobQueue
from node.jobs.model import JobKind, JobSpec, ReceivedInstance
from node.net import dimse, pdu

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_n_action_request_and_its_response_carry_what_orthanc_checks() -> None:
    request = dimse.decode_command(
        dimse.encode_action_request(
            7, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE, 1
        )
    )
    assert (request.command_field, request.message_id, request.action_type_id) == (0x0130, 7, 1)
    assert request.requested_sop_class_uid == STORAGE_COMMITMENT_PUSH_MODEL
    assert request.has_dataset
    response = dimse.decode_command(dimse.encode_response(request, 0x0000))
    # Orthanc refuses an N-ACTION-RSP without Affected SOP Class and Instance UID.
    assert response.is_response and response.name == "N-ACTION-RSP"
    assert response.affected_sop_class_uid == STORAGE_COMMITMENT_PUSH_MODEL
    assert response.affected_sop_instance_uid == STORAGE_COMMITMENT_INSTANCE
    assert (response.message_id_being_responded_to, response.status) == (7, 0x0000)
    assert not response.has_dataset


def test_n_event_report_request_and_response() -> None:
    request = dimse.decode_command(
        dimse.encode_event_report_request(
            9, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE, 2
        )
    )
    assert (request.command_field, request.event_type_id, request.sop_instance_uid) == (
        0x0100,
        2,
        STORAGE_COMMITMENT_INSTANCE,
    )
    response = dimse.decode_command(dimse.encode_response(request, 0x0000))
    assert (response.command_field, response.event_type_id, response.status) == (0x8100, 2, 0)


@pytest.mark.parametrize("syntax", COMMITMENT_SYNTAXES)
def test_data_sets_round_trip(syntax: str) -> None:
    request = CommitmentRequest("2.25.1", (Reference(CT, "1.2.3"), Reference(CT, "1.2.4")))
    assert decode_request(encode_request(request, syntax), syntax) == request
    report = CommitmentReport(
        "2.25.1", (Reference(CT, "1.2.3"),), (Failure(Reference(CT, "1.2.4"), 0x0112),)
    )
    assert decode_report(encode_report(report, syntax), syntax) == report
    assert report.event_type_id == 2


def test_a_request_without_references_is_refused() -> None:
    data = encode_request(CommitmentRequest("2.25.1", ()), str(ExplicitVRLittleEndian))
    with pytest.raises(CommitmentMessageError, match="Referenced SOP Sequence"):
        decode_request(data, str(ExplicitVRLittleEndian))
    with pytest.raises(CommitmentMessageError, match="cannot be read"):
        truncated_item = b"\x08\x00\x99\x11\xff\xff\xff\xff\xfe\xff\x00\xe0\x10\x00\x00\x00abc"
        decode_request(truncated_item, str(ImplicitVRLittleEndian))


def test_a_long_data_set_is_split_to_the_peer_maximum_pdu() -> None:
    pdus = pdu.encode_dataset_pdus(3, bytes(10_000), 4096)
    assert [len(p) for p in pdus] == [4096 + 6, 4096 + 6, 10_000 - 2 * 4090 + 12]
    assert [p[11] for p in pdus] == [0, 0, 2]  # only the last PDV is marked last


ITEM = CommitmentItem(CT, "1.2.3")


@pytest.mark.parametrize(
    ("progress", "when", "expired", "expected"),
    [
        (None, "received", False, 0x0112),
        (InstanceProgress("1.2.840.10008.5.1.4.1.1.4"), "received", False, 0x0119),
        (InstanceProgress(CT, store_open=True, forward_open=True), "received", False, COMMITTED),
        (InstanceProgress(CT, store_open=True), "stored", False, None),
        (InstanceProgress(CT, store_open=True), "stored", True, 0x0110),
        (InstanceProgress(CT, forward_open=True), "stored", False, COMMITTED),
        (InstanceProgress(CT, forward_open=True), "delivered", False, None),
        (InstanceProgress(CT, forward_open=True), "delivered", True, 0x0110),
        (InstanceProgress(CT, failed=True), "delivered", False, 0x0110),
        (InstanceProgress(CT), "delivered", False, COMMITTED),
        (InstanceProgress(""), "stored", False, COMMITTED),  # known only to the stored index
    ],
)
def test_when(
    progress: InstanceProgress | None, when: str, expired: bool, expected: int | None
) -> None:
    assert outcome(ITEM, progress, when, expired) == expected  # type: ignore[arg-type]


def _request(roles: dict[str, tuple[bool, bool]]) -> pdu.AssociateRequest:
    context = build_context(STORAGE_COMMITMENT_PUSH_MODEL, [str(ImplicitVRLittleEndian)])
    context.context_id = 1
    return pdu.AssociateRequest("A", "B", [context], 0, b"", b"", roles)


@pytest.mark.parametrize(
    ("ours", "proposed", "result", "role"),
    [
        ((False, False), None, 3, None),  # commitment off: abstract syntax not supported
        ((True, False), None, 0, None),  # a modality asking us, default roles
        ((True, False), (True, False), 0, (True, False)),
        ((True, False), (False, True), 1, None),  # a report to us, but no destination asks
        ((False, True), (False, True), 0, (False, True)),  # Orthanc reporting as SCP
        ((True, True), (True, True), 0, (True, True)),
    ],
)
def test_negotiation_grants_the_supported_roles(
    ours: tuple[bool, bool],
    proposed: tuple[bool, bool] | None,
    result: int,
    role: tuple[bool, bool] | None,
) -> None:
    roles = {STORAGE_COMMITMENT_PUSH_MODEL: proposed} if proposed else {}
    (answer,) = StorageNegotiation([ExplicitVRLittleEndian], ours)(_request(roles))
    assert (answer.result, answer.role) == (result, role)
    if result == 0:
        assert answer.transfer_syntax == str(ImplicitVRLittleEndian)


def _instance(uid: str, folder: Path) -> ReceivedInstance:
    return ReceivedInstance(uid, CT, str(ExplicitVRLittleEndian), "CT01", "NODE", folder / uid, 10)


def test_finished_instances_are_remembered_only_with_keep_finished(tmp_path: Path) -> None:
    database = Database(tmp_path / "queue.sqlite3")
    records = SqliteCommitments(database)
    for keep, uid in ((True, "1.2.10"), (False, "1.2.11")):
        queue = SqliteJobQueue(database, keep_finished=keep)
        queue.record_instance(_instance(uid, tmp_path), [JobSpec(JobKind.FORWARD, "pacs")])
        (job,) = queue.claim(JobKind.FORWARD)
        assert records.instance_progress([uid]) == {uid: InstanceProgress(CT, False, True, False)}
        queue.complete(job, "sent")
    assert records.instance_progress(["1.2.10", "1.2.11"]) == {"1.2.10": InstanceProgress(CT)}
    assert records.prune_finished(before=0.0) == 0
    assert records.prune_finished(before=9e9) == 1
    assert records.instance_progress(["1.2.10"]) == {}


def test_a_sent_commitment_holds_its_jobs_until_the_deadline(tmp_path: Path) -> None:
    database = Database(tmp_path / "queue.sqlite3")
    records = SqliteCommitments(database)
    queue = SqliteJobQueue(database)
    queue.record_instance(_instance("1.2.20", tmp_path), [JobSpec(JobKind.FORWARD, "pacs")])
    (job,) = queue.claim(JobKind.FORWARD)
    item = CommitmentItem(CT, "1.2.20", job_id=job.id)
    first = records.record_commitment(
        NewCommitment(Direction.SENT, "2.25.5", "pacs", "NODE", 9e9, (item,)), waiting=[job]
    )
    assert queue.claim(JobKind.FORWARD) == []  # pending, but not due before the deadline
    assert [j.id for j in records.jobs_by_id([job.id])] == [job.id]
    second = records.record_commitment(
        NewCommitment(Direction.SENT, "2.25.6", "pacs", "NODE", 9e9, (item,)), waiting=[job]
    )
    # The job is now vouched for by the newer request only.
    opened = {c.id: c.items for c in records.open_commitments(Direction.SENT)}
    assert opened == {first: (), second: (item,)}
    [summary] = records.commitment_summary()
    assert (summary.direction, summary.peer, summary.count, summary.instances) == (
        "sent",
        "pacs",
        2,
        1,
    )


@pytest.mark.parametrize(
    ("data", "key", "message"),
    [
        (
            {"node": {"acceptor": "pynetdicom"}, "commitment": {"enabled": True}},
            "commitment.enabled",
            'needs node.acceptor = "native"',
        ),
        (
            {
                "node": {"acceptor": "pynetdicom"},
                "destination": [
                    {"name": "a", "ae_title": "A", "host": "h", "port": 104},
                    {"name": "b", "ae_title": "B", "host": "h", "port": 104, "commitment": True},
                ],
            },
            "destination[1].commitment",
            'needs node.acceptor = "native"',
        ),
        (
            {"node": {"receivers": 2}, "commitment": {"enabled": True}},
            "commitment.enabled",
            "needs node.receivers = 1",
        ),
        (
            {
                "destination": [
                    {
                        "name": "w",
                        "protocol": "dicomweb",
                        "url": "http://h/dicom-web",
                        "commitment": True,
                    }
                ]
            },
            "destination[0].commitment",
            "is for DIMSE destinations",
        ),
        ({"commitment": {"when": "forwarded"}}, "commitment.when", "must be one of"),
        (
            {"commitment": {"requestor": [{"ae_title": "CT01", "host": "h"}]}},
            "commitment.requestor[0].port",
            "is required",
        ),
    ],
)
def test_config_errors_name_the_key(data: dict[str, object], key: str, message: str) -> None:
    from node.config.model import parse_config
    from node.config.schema import ConfigError

    with pytest.raises(ConfigError) as raised:
        parse_config(data, Path("/etc/dicom-node/config.toml"))
    assert raised.value.key == key
    assert message in raised.value.message
