"""The queue's seams, on both backends: lookups that never wait behind a writer, and one
retry schedule for all jobs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.cli.main import main as cli_main
from node.config.model import StorageConfig
from node.forward import forwarder
from node.ingest.spool import Spool
from node.jobs.interface import JobQueue, QueueOperations
from node.jobs.jobqueue import SqliteJobQueue
from node.jobs.model import Job, JobKind, JobSpec, JobState, ReceivedInstance
from node.jobs.postgres import PostgresJobQueue
from node.jobs.postgres_reports import PostgresQueueOperations
from node.jobs.reports import SqliteQueueOperations
from node.jobs.retry import Backoff, RetrySchedule
from node.store.targets import StorageTarget
from node.store.workers import StagedFile, StoreWorkers
from tests.jobs.conftest import QueueBackend

ARCHIVE = JobSpec(JobKind.STORE, "archive")
PACS = JobSpec(JobKind.FORWARD, "pacs")


def record(queue: JobQueue, folder: Path, uid: str, jobs: list[JobSpec]) -> Path:
    spooled = folder / f"{uid}.dcm"
    spooled.write_bytes(b"dicm")
    instance = ReceivedInstance(
        uid, CTImageStorage, ExplicitVRLittleEndian, "CT", "NODE", spooled, 4
    )
    queue.record_instance(instance, jobs)
    return spooled


def test_lookups_and_reports_do_not_wait_behind_a_writer_in_its_transaction(
    tmp_path: Path, queue_backend: QueueBackend
) -> None:
    queue, operations = queue_backend.queue, queue_backend.reports
    spooled = record(queue, tmp_path, "1.2.3", [ARCHIVE, PACS])
    lookups: dict[str, Callable[[], object]] = {
        "report": lambda: [(r.kind, r.target, r.state, r.count) for r in operations.report()],
        "recent_failures": lambda: operations.recent_failures(5),
        "spool_summary": lambda: operations.spool_summary().instances,
        "purgeable": lambda: operations.purgeable(None, None, [JobState.PENDING]),
        "spool_paths": queue.spool_paths,
        "open_targets": lambda: queue.open_targets(JobKind.FORWARD),
        "made_due_since": lambda: queue.made_due_since(JobKind.FORWARD, "pacs", time.time()),
        "next_due_in": lambda: queue.next_due_in(JobKind.STORE) == 0.0,
        "stored_path": lambda: queue.stored_path("archive", "1.2.3"),
        "is_known": lambda: queue.is_known("archive", "1.2.3"),
    }
    in_transaction, release = threading.Event(), threading.Event()

    def hold_the_writer() -> None:
        # What a group commit does while its fsync runs: the writer is taken, for seconds.
        with queue_backend.hold_writer()():
            in_transaction.set()
            release.wait(30)

    results: dict[str, object] = {}
    writer = threading.Thread(target=hold_the_writer)
    reader = threading.Thread(target=lambda: results.update({k: f() for k, f in lookups.items()}))
    writer.start()
    assert in_transaction.wait(10)
    try:
        reader.start()
        reader.join(5)
        finished_while_held = not reader.is_alive()
    finally:
        release.set()
        writer.join(10)
        reader.join(30)
    assert finished_while_held, "a lookup waited for the writer's commit"
    assert results == {
        "report": [("forward", "pacs", "pending", 1), ("store", "archive", "pending", 1)],
        "recent_failures": [],
        "spool_summary": 1,
        "purgeable": 2,
        "spool_paths": {spooled},
        "open_targets": ["pacs"],
        "made_due_since": False,
        "next_due_in": True,
        "stored_path": None,
        "is_known": True,
    }


def failing_stage(job: Job, target: StorageTarget, staged: Path) -> StagedFile:
    raise OSError(28, "No space left on device")


def store_workers(
    tmp_path: Path, queue: JobQueue, schedule: RetrySchedule | None = None
) -> StoreWorkers:
    target = StorageTarget(StorageConfig("archive", tmp_path / "archive"))
    spool = Spool(tmp_path / "spool")
    if schedule is None:  # the node's own
        return StoreWorkers(queue, spool, {"archive": target}, stage=failing_stage)
    return StoreWorkers(queue, spool, {"archive": target}, stage=failing_stage, schedule=schedule)


def retry_delays(backend: QueueBackend) -> list[float]:
    """Each pending job's delay, as retry_later wrote it (next try minus when it was set)."""
    rows = backend.rows("SELECT next_attempt_at - updated_at FROM jobs WHERE state = 'pending'")
    return [row[0] for row in rows]


def test_store_jobs_retry_with_jitter_and_never_become_dead_letters(
    tmp_path: Path, queue_backend: QueueBackend
) -> None:
    queue, operations = queue_backend.queue, queue_backend.reports
    for index in range(30):
        record(queue, tmp_path, f"1.2.{index}", [ARCHIVE])
    workers = store_workers(tmp_path, queue)
    for job in queue.claim(JobKind.STORE, limit=30):
        workers.run(job)
    first = retry_delays(queue_backend)
    assert len(first) == 30 and all(0.8 - 1e-3 <= d <= 1.0 + 1e-3 for d in first), first
    assert max(first) - min(first) > 0.02, "store retries in lockstep: no jitter"

    for _ in range(39):  # a disk full for hours: attempt 40 is still retried, capped at 5 min
        operations.retry(JobKind.STORE, "archive")
        (job, *_) = queue.claim(JobKind.STORE, limit=1)
        workers.run(job)
    assert job.attempts == 40
    report = {(r.state, r.count) for r in operations.report()}
    assert report == {("pending", 30)}, "a store job became a dead letter"
    assert max(retry_delays(queue_backend)) == pytest.approx(300, rel=0.21)


def test_the_one_schedule_dead_letters_store_jobs_when_configured(
    tmp_path: Path, queue_backend: QueueBackend
) -> None:
    queue = queue_backend.queue
    record(queue, tmp_path, "1.2.3", [ARCHIVE])
    twice = RetrySchedule(Backoff(initial_delay=0.0, max_delay=0.0, max_attempts=2))
    workers = store_workers(tmp_path, queue, twice)
    assert forwarder.RetrySchedule is RetrySchedule is type(workers.schedule)
    for _ in range(2):
        (job,) = queue.claim(JobKind.STORE)
        workers.run(job)
    (failure,) = queue_backend.reports.recent_failures(5)
    assert failure.error.startswith("gave up after 2 attempts: [Errno 28] No space left")


def test_queue_status_says_when_each_target_gives_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[[storage]]\nname = "archive"\npath = "{tmp_path / "archive"}"\n'
        '[[destination]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
        "[destination.retry]\nmax_attempts = 7\n"
        '[[destination]]\nname = "vna"\nae_title = "VNA"\nhost = "127.0.0.1"\nport = 105\n'
    )
    SqliteJobQueue.open(tmp_path / "data" / "queue.sqlite3").close()
    assert cli_main(["queue", "status", "-c", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "GIVES UP" in lines[0]
    rows = {line.split()[1]: line.split()[-1] for line in lines[1:]}
    assert rows == {"archive": "never", "pacs": "7", "vna": "never"}


def test_every_backend_has_every_method_of_the_interface() -> None:
    for protocol, backend in [
        (JobQueue, SqliteJobQueue),
        (QueueOperations, SqliteQueueOperations),
        (JobQueue, PostgresJobQueue),
        (QueueOperations, PostgresQueueOperations),
    ]:
        wanted = {name for name in dir(protocol) if not name.startswith("_")}
        assert wanted and wanted <= set(dir(backend)), wanted - set(dir(backend))
