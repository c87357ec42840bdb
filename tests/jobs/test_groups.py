"""Series and study groups in the queue, through the interface only (any backend: conftest).

Membership recorded with the instance, grouped jobs that `claim` never takes, dispatch,
claims of a whole group in sending order, late arrivals as new versions, delivered only
when every member is, and what a restart does to a group in flight.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.daemon.group_timer import GroupTimer
from node.jobs.interface import JobQueue, QueueOperations
from node.jobs.model import (
    GroupLevel,
    GroupMembership,
    GroupReport,
    GroupState,
    GroupTrigger,
    JobKind,
    JobSpec,
    ReceivedInstance,
    group_due,
    summarise_targets,
)
from tests.jobs.conftest import QueueBackend


@dataclass
class Queues:
    """A queue backend under test: the worker-facing queue and the operator's reports on
    one store (these tests use only the interface), and a folder for spool files."""

    queue: JobQueue
    reports: QueueOperations
    folder: Path


@pytest.fixture
def queues(queue_backend: QueueBackend, tmp_path: Path) -> Queues:
    """Both backends (tests/jobs/conftest.py: SQLite, then PostgreSQL)."""
    return Queues(queue_backend.queue, queue_backend.reports, tmp_path)


SERIES = GroupTrigger(GroupLevel.SERIES, "mr-to-ai", stable_after=30.0, force_after=600.0)
STUDY = GroupTrigger(GroupLevel.STUDY, "studies", stable_after=30.0)
STUDY_UID = "1.2.826.0.1.3680043.10.1"
_uids = itertools.count(1)


def record(
    queues: Queues,
    *,
    trigger: GroupTrigger = SERIES,
    series: str = "1.2.826.0.1.3680043.10.1.1",
    series_number: int | None = 1,
    instance_number: int | None = 1,
    description: str = "",
    targets: tuple[JobSpec, ...] = (JobSpec(JobKind.FORWARD, "ai"),),
    plain: tuple[JobSpec, ...] = (JobSpec(JobKind.STORE, "archive"),),
) -> str:
    """Record one instance whose `targets` jobs are grouped and `plain` ones are not."""
    uid = f"1.2.826.0.1.3680043.10.9.{next(_uids)}"
    spooled = queues.folder / f"{uid}.dcm"
    spooled.write_bytes(b"dicm")
    membership = GroupMembership(
        trigger=trigger,
        study_instance_uid=STUDY_UID,
        series_instance_uid=series if trigger.level == GroupLevel.SERIES else "",
        member_series_uid=series,
        series_number=series_number,
        instance_number=instance_number,
        series_description=description,
    )
    instance = ReceivedInstance(
        uid, CTImageStorage, ExplicitVRLittleEndian, "MODALITY", "NODE", spooled, 4
    )
    jobs = [replace(job, group=membership) for job in targets] + list(plain)
    queues.queue.record_instance(instance, jobs)
    return uid


def only_group(queues: Queues) -> GroupReport:
    (group,) = queues.queue.waiting_groups()
    return group


def states(queues: Queues) -> dict[tuple[str, str, str], int]:
    return {(r.kind, r.target, r.state): r.count for r in queues.reports.report()}


def test_grouped_jobs_wait_in_their_group_and_claim_never_takes_them(queues: Queues) -> None:
    for number in (1, 2, 3):
        record(queues, instance_number=number, description="T1 AX")
    assert queues.queue.claim(JobKind.FORWARD) == []
    assert len(queues.queue.claim(JobKind.STORE)) == 3  # the ungrouped jobs go as they came
    group = only_group(queues)
    assert (group.kind, group.target, group.route, group.level, group.state) == (
        "forward",
        "ai",
        "mr-to-ai",
        "series",
        "waiting",
    )
    assert (group.study_instance_uid, group.series_instance_uid) == (
        STUDY_UID,
        "1.2.826.0.1.3680043.10.1.1",
    )
    assert (group.members, group.version, group.stable_after, group.force_after) == (
        3,
        1,
        30.0,
        600.0,
    )
    assert group.first_arrival_at <= group.last_arrival_at
    assert states(queues)[("forward", "ai", "waiting")] == 3
    # `dicom-node status` and the systemd status line count them as on their way.
    (ai,) = [t for t in summarise_targets(queues.reports.report()) if t.target == "ai"]
    assert (ai.pending, ai.oldest_pending) == (3, group.first_arrival_at)
    assert queues.queue.open_targets(JobKind.FORWARD) == ["ai"]
    assert queues.queue.next_due_in(JobKind.FORWARD) is None  # not due until dispatched


def test_a_dispatched_study_is_claimed_whole_in_series_then_instance_order(
    queues: Queues,
) -> None:
    arrivals = [  # (series UID, Series Number, Instance Number), as a modality might send them
        ("1.2.3.20", 2, 2),
        ("1.2.3.10", 1, 3),
        ("1.2.3.20", 2, 1),
        ("1.2.3.10", 1, None),
        ("1.2.3.10", 1, 1),
        ("1.2.3.30", None, 1),
    ]
    uids = {
        record(queues, trigger=STUDY, series=s, series_number=n, instance_number=i): (s, n, i)
        for s, n, i in arrivals
    }
    group = only_group(queues)
    assert (group.level, group.series_instance_uid, group.members) == ("study", "", 6)
    assert queues.queue.claim_group(JobKind.FORWARD, "ai") is None  # not dispatched yet
    assert queues.queue.dispatch_group(group.id, "stable for 30 s", if_members=6)
    claim = queues.queue.claim_group(JobKind.FORWARD, "ai")
    assert claim is not None
    assert [uids[job.instance.sop_instance_uid] for job in claim.jobs] == [
        ("1.2.3.10", 1, 1),
        ("1.2.3.10", 1, 3),
        ("1.2.3.10", 1, None),
        ("1.2.3.20", 2, 1),
        ("1.2.3.20", 2, 2),
        ("1.2.3.30", None, 1),
    ]
    assert [job.attempts for job in claim.jobs] == [1] * 6
    assert (claim.group.id, claim.group.reason, claim.group.state) == (
        group.id,
        "stable for 30 s",
        "dispatched",
    )
    assert queues.queue.claim_group(JobKind.FORWARD, "ai") is None  # all taken
    assert queues.queue.claim(JobKind.FORWARD) == []
    assert queues.queue.waiting_groups() == []


def test_a_group_that_grew_since_it_was_seen_is_not_dispatched_as_stable(queues: Queues) -> None:
    record(queues)
    seen = only_group(queues)
    record(queues, instance_number=2)  # arrives between the timer's read and its dispatch
    assert not queues.queue.dispatch_group(seen.id, "stable", if_members=seen.members)
    assert only_group(queues).state == "waiting"
    assert queues.queue.dispatch_group(seen.id, "forced", if_members=None)
    assert not queues.queue.dispatch_group(seen.id, "again")  # dispatched once only
    assert queues.queue.waiting_groups() == []


def test_a_late_arrival_starts_the_next_version_and_is_counted(queues: Queues) -> None:
    first = {record(queues, instance_number=n) for n in (1, 2)}
    assert queues.reports.group_totals().late_arrivals == 0
    group = only_group(queues)
    assert queues.queue.dispatch_group(group.id, "stable")
    late = record(queues, instance_number=3)
    follow_up = only_group(queues)
    assert (follow_up.version, follow_up.members, follow_up.state) == (2, 1, "waiting")
    assert follow_up.id != group.id
    assert queues.reports.group_totals().late_arrivals == 1
    record(queues, instance_number=4)
    assert only_group(queues).members == 2
    assert queues.reports.group_totals().late_arrivals == 2
    # The dispatched version is sent as it was: nothing late is added to it, nothing resent.
    claim = queues.queue.claim_group(JobKind.FORWARD, "ai")
    assert claim is not None
    assert {job.instance.sop_instance_uid for job in claim.jobs} == first
    assert late not in first


def test_a_group_is_delivered_only_when_every_member_is_and_a_failure_holds_only_it(
    queues: Queues,
) -> None:
    for number in (1, 2, 3):
        record(queues, instance_number=number, targets=(JobSpec(JobKind.FORWARD, "ai"),))
    record(queues, series="1.2.3.99", targets=(JobSpec(JobKind.FORWARD, "pacs"),))
    for group in queues.queue.waiting_groups():
        assert queues.queue.dispatch_group(group.id, "stable")
    ai = queues.queue.claim_group(JobKind.FORWARD, "ai")
    pacs = queues.queue.claim_group(JobKind.FORWARD, "pacs")
    assert ai is not None and pacs is not None
    queues.queue.complete_many([(job, "success") for job in ai.jobs[:2]])
    queues.queue.dead_letter(ai.jobs[2], "status 0xA900 (data set does not match SOP class)")
    queues.queue.complete_many([(job, "success") for job in pacs.jobs])
    settled = queues.queue.settle_groups()
    assert [(g.target, g.state, g.members) for g in settled] == [("pacs", "delivered", 1)]
    (held,) = queues.reports.dispatched_groups()
    assert held.target == "ai"
    assert held.reason == "a member failed: status 0xA900 (data set does not match SOP class)"
    assert queues.queue.settle_groups() == []
    # The operator fixes the cause: the member goes again on its own, and the group is done.
    assert queues.reports.retry(JobKind.FORWARD, "ai", failed=True) == 1
    (again,) = queues.queue.claim(JobKind.FORWARD, target="ai")
    assert again.id == ai.jobs[2].id
    queues.queue.complete(again, "success")
    (delivered,) = queues.queue.settle_groups()
    assert (delivered.id, delivered.state, delivered.members) == (held.id, "delivered", 3)
    assert queues.reports.dispatched_groups() == []


def test_after_a_restart_a_group_in_flight_is_sent_as_a_group_again(queues: Queues) -> None:
    for number in (1, 2, 3):
        record(queues, instance_number=number)
    assert queues.queue.dispatch_group(only_group(queues).id, "stable")
    claim = queues.queue.claim_group(JobKind.FORWARD, "ai")
    assert claim is not None
    queues.queue.complete(claim.jobs[0], "success")  # delivered before the crash
    assert queues.queue.requeue_running() == 0  # the other two are the group's again
    assert queues.queue.claim(JobKind.FORWARD) == []
    again = queues.queue.claim_group(JobKind.FORWARD, "ai")
    assert again is not None
    assert [job.id for job in again.jobs] == [job.id for job in claim.jobs[1:]]
    assert [job.attempts for job in again.jobs] == [2, 2]


def test_a_broken_association_gives_the_rest_back_to_the_group(queues: Queues) -> None:
    for number in (1, 2, 3):
        record(queues, instance_number=number)
    assert queues.queue.dispatch_group(only_group(queues).id, "stable")
    claim = queues.queue.claim_group(JobKind.FORWARD, "ai")
    assert claim is not None
    queues.queue.return_to_group(claim.jobs, "association aborted by the peer")
    again = queues.queue.claim_group(JobKind.FORWARD, "ai")
    assert again is not None
    assert [job.attempts for job in again.jobs] == [2, 1, 1]  # only the first was tried
    queues.queue.return_to_group(again.jobs)  # stopping: none tried
    last = queues.queue.claim_group(JobKind.FORWARD, "ai")
    assert last is not None and [job.attempts for job in last.jobs] == [2, 1, 1]


def test_a_storage_group_makes_its_store_jobs_due_together(queues: Queues) -> None:
    archive = (JobSpec(JobKind.STORE, "archive"),)
    for number in (1, 2):
        record(queues, instance_number=number, targets=archive, plain=())
    assert queues.queue.claim(JobKind.STORE) == []
    assert queues.queue.dispatch_group(only_group(queues).id, "stable")
    stored = queues.queue.claim(JobKind.STORE)
    assert len(stored) == 2
    queues.queue.complete_stored(stored[0], queues.folder / "a.dcm", ExplicitVRLittleEndian)
    assert queues.queue.settle_groups() == []
    queues.queue.complete_stored(stored[1], queues.folder / "b.dcm", ExplicitVRLittleEndian)
    assert [g.state for g in queues.queue.settle_groups()] == ["delivered"]


def test_hold_keeps_a_group_from_its_timer_until_release(queues: Queues) -> None:
    record(queues, series="1.2.3.1")
    record(queues, series="1.2.3.2")
    assert queues.reports.hold_groups(series="1.2.3.1") == 1
    held = {g.series_instance_uid: g for g in queues.queue.waiting_groups()}
    assert held["1.2.3.1"].state == "held" and held["1.2.3.2"].state == "waiting"
    assert group_due(held["1.2.3.1"]) == (None, "")
    assert queues.reports.hold_groups(series="1.2.3.1") == 0  # already held
    assert queues.reports.release_groups(study=STUDY_UID, target="other") == 0
    assert queues.reports.release_groups(study=STUDY_UID) == 2
    assert queues.queue.waiting_groups() == []
    claim = queues.queue.claim_group(JobKind.FORWARD, "ai")
    assert claim is not None and claim.group.reason == "released by an operator"


def test_the_timer_dispatches_from_the_recorded_last_arrival(queues: Queues) -> None:
    woken: list[int] = []
    timer = GroupTimer(queues.queue, lambda: woken.append(1))
    record(queues)
    group = only_group(queues)
    stable_at = group.last_arrival_at + group.stable_after
    pause = timer.tick(now=stable_at - 0.2)
    assert only_group(queues).state == "waiting" and woken == []
    assert 0 < pause <= 0.5
    timer.tick(now=stable_at + 0.01)
    assert queues.queue.waiting_groups() == [] and woken == [1]
    claim = queues.queue.claim_group(JobKind.FORWARD, "ai")
    assert claim is not None and claim.group.reason == "stable for 30 s"


def _group(**changes: object) -> GroupReport:
    base = GroupReport(
        id=1,
        kind="forward",
        target="ai",
        route="r",
        level="series",
        study_instance_uid="1",
        series_instance_uid="1.1",
        version=1,
        state=GroupState.WAITING,
        members=3,
        first_arrival_at=1000.0,
        last_arrival_at=1100.0,
        stable_after=30.0,
        force_after=0.0,
        expected_instances=0,
        required_series=(),
        series_descriptions=(),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "due"),
    [
        ({}, (1130.0, "stable for 30 s")),
        ({"force_after": 120.0}, (1120.0, "forced after 120 s")),
        ({"force_after": 600.0}, (1130.0, "stable for 30 s")),
        ({"expected_instances": 3}, (1100.0, "complete: 3 of 3 instances")),
        ({"expected_instances": 5, "force_after": 900.0}, (1900.0, "forced after 900 s")),
        ({"expected_instances": 5}, (None, "")),
        ({"expected_instances": 5, "version": 2}, (1130.0, "stable for 30 s")),
        (
            {"required_series": ("T1*", "T2*"), "series_descriptions": ("T1 AX",)},
            (None, ""),
        ),
        (
            {"required_series": ("T1*", "T2*"), "series_descriptions": ("T2 COR", "T1 AX")},
            (1130.0, "stable for 30 s"),
        ),
        ({"state": GroupState.HELD}, (None, "")),
    ],
)
def test_when_a_group_is_due(changes: dict[str, object], due: tuple[float | None, str]) -> None:
    assert group_due(_group(**changes)) == due
