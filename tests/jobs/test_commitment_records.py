"""Storage Commitment records on both queue backends (the queue-level tests of
tests/commitment/test_commitment_units.py, through node.jobs.backends)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.jobs.backends import open_queue
from node.jobs.commitments import CommitmentItem, Direction, InstanceProgress, NewCommitment
from node.jobs.model import JobKind, JobSpec, ReceivedInstance
from tests.jobs.conftest import QueueBackend

CT = str(CTImageStorage)


def _instance(uid: str, folder: Path) -> ReceivedInstance:
    return ReceivedInstance(uid, CT, str(ExplicitVRLittleEndian), "CT01", "NODE", folder / uid, 10)


def test_finished_instances_are_remembered_only_with_keep_finished(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    records = queue_backend.opened.commitments
    keeping = open_queue(dataclasses.replace(queue_backend.settings, keep_finished=True))
    try:
        for queue, uid in ((keeping.queue, "1.2.10"), (queue_backend.queue, "1.2.11")):
            queue.record_instance(_instance(uid, tmp_path), [JobSpec(JobKind.FORWARD, "pacs")])
            (job,) = queue.claim(JobKind.FORWARD)
            progress = records.instance_progress([uid])
            assert progress == {uid: InstanceProgress(CT, False, True, False)}
            queue.complete(job, "sent")
        assert records.instance_progress(["1.2.10", "1.2.11"]) == {"1.2.10": InstanceProgress(CT)}
        assert records.prune_finished(before=0.0) == 0
        assert records.prune_finished(before=9e9) == 1
        assert records.instance_progress(["1.2.10"]) == {}
    finally:
        keeping.close()


def test_a_sent_commitment_holds_its_jobs_until_the_deadline(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    records, queue = queue_backend.opened.commitments, queue_backend.queue
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
    opened = {c.id: c.items for c in records.open_commitments(Direction.SENT)}
    assert opened == {first: (), second: (item,)}
    [summary] = records.commitment_summary()
    assert (summary.direction, summary.peer, summary.count, summary.instances) == (
        "sent",
        "pacs",
        2,
        1,
    )
    records.settle_items(second, {0: 0})
    (settled,) = [c for c in records.open_commitments(Direction.SENT) if c.id == second]
    assert settled.settled
    records.close_commitment(second)
    records.defer_commitment(first, "no answer", 9e9)
    assert [c.id for c in records.open_commitments(Direction.SENT)] == [first]
