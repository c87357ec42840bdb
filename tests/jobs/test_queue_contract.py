"""The queue interface's promises, held to both backends (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.jobs.interface import JobQueue
from node.jobs.model import JobKind, JobSpec, JobState, ReceivedInstance
from tests.jobs.conftest import QueueBackend

ARCHIVE = JobSpec(JobKind.STORE, "archive")
PACS = JobSpec(JobKind.FORWARD, "pacs")
VNA = JobSpec(JobKind.FORWARD, "vna")


def record(queue: JobQueue, folder: Path, uid: str, jobs: list[JobSpec]) -> Path:
    spooled = folder / f"{uid}.dcm"
    spooled.write_bytes(b"dicm")
    instance = ReceivedInstance(
        uid, CTImageStorage, ExplicitVRLittleEndian, "CT", "NODE", spooled, 4
    )
    queue.record_instance(instance, jobs)
    return spooled


def states(backend: QueueBackend) -> dict[tuple[str, str, str], int]:
    return {(r.kind, r.target, r.state): r.count for r in backend.reports.report()}


def test_an_instance_is_finished_when_its_last_job_is_done(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    queue = queue_backend.queue
    spooled = record(queue, tmp_path, "1.2.1", [ARCHIVE, PACS])
    assert queue.spool_paths() == {spooled}
    (store,) = queue.claim(JobKind.STORE)
    assert (store.attempts, store.instance.sop_instance_uid, store.instance.spool_path) == (
        1,
        "1.2.1",
        spooled,
    )
    assert store.instance.received_at is not None  # the forward delivery delay metric's start
    assert queue.claim(JobKind.STORE) == [], "a running job was claimed twice"
    stored_at = tmp_path / "archive" / "1.2.1.dcm"
    assert queue.complete_stored(store, stored_at, ExplicitVRLittleEndian) is None
    assert queue.stored_path("archive", "1.2.1") == stored_at
    assert states(queue_backend) == {
        ("forward", "pacs", "pending"): 1,
        ("store", "archive", "done"): 1,
    }
    (forward,) = queue.claim(JobKind.FORWARD, target="pacs")
    assert queue.complete(forward, "0x0000") == spooled
    assert states(queue_backend) == {}
    assert queue.spool_paths() == set()
    assert queue_backend.reports.spool_summary().instances == 0


def test_complete_many_returns_only_the_finished_instances(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    queue = queue_backend.queue
    first = record(queue, tmp_path, "1.2.1", [PACS])
    record(queue, tmp_path, "1.2.2", [PACS, VNA])
    jobs = queue.claim(JobKind.FORWARD, target="pacs")
    assert len(jobs) == 2
    assert queue.complete_many([(job, "0x0000") for job in jobs]) == [first]
    assert states(queue_backend) == {
        ("forward", "pacs", "done"): 1,
        ("forward", "vna", "pending"): 1,
    }


def test_release_retry_later_and_next_due_in(queue_backend: QueueBackend, tmp_path: Path) -> None:
    queue = queue_backend.queue
    record(queue, tmp_path, "1.2.1", [PACS])
    assert queue.next_due_in(JobKind.FORWARD) == 0.0
    assert queue.next_due_in(JobKind.STORE) is None
    (job,) = queue.claim(JobKind.FORWARD)
    queue.release([job])
    (again,) = queue.claim(JobKind.FORWARD)
    assert again.attempts == 1, "a released job counted as tried"
    queue.retry_later(again, "association refused", 60.0)
    assert queue.claim(JobKind.FORWARD) == []
    due = queue.next_due_in(JobKind.FORWARD, "pacs")
    assert due is not None and 55.0 < due <= 60.0
    (row,) = queue_backend.reports.report()
    assert (row.state, row.last_error, row.max_attempts) == (
        "pending",
        "association refused",
        1,
    )
    assert queue_backend.reports.retry(JobKind.FORWARD, "pacs") == 1
    (third,) = queue.claim(JobKind.FORWARD)
    assert third.attempts == 2


def test_dead_letters_are_reported_retried_and_purged(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    queue, reports = queue_backend.queue, queue_backend.reports
    record(queue, tmp_path, "1.2.1", [PACS])
    spooled = record(queue, tmp_path, "1.2.2", [PACS])
    for job in queue.claim(JobKind.FORWARD):
        queue.dead_letter(job, f"refused {job.instance.sop_instance_uid}")
    failures = reports.recent_failures(5)
    assert sorted((f.sop_instance_uid, f.error) for f in failures) == [
        ("1.2.1", "refused 1.2.1"),
        ("1.2.2", "refused 1.2.2"),
    ]
    assert reports.count_dead_letters(JobKind.FORWARD, "pacs") == 2
    assert reports.count_dead_letters(JobKind.STORE, None) == 0
    newest, *_ = reports.dead_letters(None, None, 0, 1)
    (older,) = reports.dead_letters(JobKind.FORWARD, "pacs", 1, 5)
    assert {newest.sop_instance_uid, older.sop_instance_uid} == {"1.2.1", "1.2.2"}
    assert (newest.kind, newest.target, newest.attempts) == ("forward", "pacs", 1)
    assert newest.error == f"refused {newest.sop_instance_uid}"
    assert reports.retry(failed=True) == 2
    (job, other) = queue.claim(JobKind.FORWARD)
    assert job.attempts == 1, "a re-queued dead letter kept its attempts"
    queue.dead_letter(job, "again")
    queue.dead_letter(other, "again")
    assert reports.purgeable(JobKind.FORWARD, "pacs", [JobState.FAILED]) == 2
    count, finished = reports.purge(JobKind.FORWARD, "pacs", [JobState.FAILED])
    assert count == 2 and spooled in finished and len(finished) == 2
    assert states(queue_backend) == {}


def test_targets_gone_and_held(queue_backend: QueueBackend, tmp_path: Path) -> None:
    queue = queue_backend.queue
    record(queue, tmp_path, "1.2.1", [PACS, VNA])
    assert sorted(queue.open_targets(JobKind.FORWARD)) == ["pacs", "vna"]
    assert queue.dead_letter_target(JobKind.FORWARD, "vna", "no [[destination]] vna") == 1
    assert queue.open_targets(JobKind.FORWARD) == ["pacs"]
    held_from = time.time()
    queue.defer_target(JobKind.FORWARD, "pacs", time.time() + 300, new_only=True)
    assert queue.claim(JobKind.FORWARD) == []
    assert not queue.made_due_since(JobKind.FORWARD, "pacs", held_from)
    time.sleep(0.01)
    queue_backend.reports.retry(JobKind.FORWARD, "pacs")
    assert queue.made_due_since(JobKind.FORWARD, "pacs", held_from)
    assert [j.target for j in queue.claim(JobKind.FORWARD)] == ["pacs"]


def test_requeue_running_and_is_known(queue_backend: QueueBackend, tmp_path: Path) -> None:
    queue = queue_backend.queue
    record(queue, tmp_path, "1.2.1", [ARCHIVE])
    assert queue.is_known("archive", "1.2.1")
    assert not queue.is_known("archive", "1.2.9")
    assert not queue.is_known("other", "1.2.1")
    queue.claim(JobKind.STORE)
    assert queue.requeue_running() == 1
    assert states(queue_backend) == {("store", "archive", "pending"): 1}


def test_an_instance_and_its_jobs_are_one_commit(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    """A job for a target that cannot be recorded takes the whole instance with it."""
    queue = queue_backend.queue
    spooled = tmp_path / "x.dcm"
    spooled.write_bytes(b"dicm")
    instance = ReceivedInstance(
        "1.2.1", CTImageStorage, ExplicitVRLittleEndian, "CT", "N", spooled, 4
    )
    bad = JobSpec(JobKind.FORWARD, None)  # type: ignore[arg-type]  # NOT NULL target
    try:
        queue.record_instance(instance, [ARCHIVE, bad])
    except Exception:
        pass
    else:
        raise AssertionError("a job with no target was recorded")
    assert queue_backend.rows("SELECT COUNT(*) FROM instances") == [(0,)]
    assert queue_backend.rows("SELECT COUNT(*) FROM jobs") == [(0,)]


def test_complete_stored_many_records_each_and_finishes_instances(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    queue = queue_backend.queue
    if not hasattr(queue, "complete_stored_many"):
        pytest.skip("the SQLite backend gains complete_stored_many with the store's batches")
    first = record(queue, tmp_path, "1.2.1", [ARCHIVE])
    record(queue, tmp_path, "1.2.2", [ARCHIVE, PACS])
    jobs = queue.claim(JobKind.STORE)
    done = [
        (job, tmp_path / f"{job.instance.sop_instance_uid}.stored", "1.2.840.10008.1.2.1")
        for job in jobs
    ]
    assert queue.complete_stored_many(done) == [first]  # type: ignore[attr-defined]
    assert queue.stored_path("archive", "1.2.2") == tmp_path / "1.2.2.stored"
    assert states(queue_backend) == {
        ("forward", "pacs", "pending"): 1,
        ("store", "archive", "done"): 1,
    }
