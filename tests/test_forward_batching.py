"""The forwarder's bookkeeping off the sending path: batched claims that give untried jobs
back unchanged, and deliveries committed in groups by the completions thread."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from node.config.model import DestinationConfig, NodeConfig, RetryPolicy
from node.forward.completions import Completions, Delivery
from node.forward.derived import DerivedFiles
from node.forward.forwarder import CLAIM_BATCH, Forwarder
from node.ingest.spool import Spool
from node.jobs.jobqueue import SqliteJobQueue
from node.jobs.model import JobKind, JobSpec
from tests.support import free_port, wait_until
from tests.test_forward_rules import record

PACS = JobSpec(JobKind.FORWARD, "pacs")
ARCHIVE = JobSpec(JobKind.STORE, "archive")


def job_rows(queue_path: Path) -> dict[str, tuple[str, int]]:
    """SOP Instance UID -> (state, attempts) of its forward job, read like an operator would."""
    with sqlite3.connect(queue_path) as db:
        rows = db.execute(
            "SELECT instances.sop_instance_uid, jobs.state, jobs.attempts FROM jobs"
            " JOIN instances ON instances.id = jobs.instance_id WHERE jobs.kind = 'forward'"
        ).fetchall()
    return {uid: (state, attempts) for uid, state, attempts in rows}


def test_released_jobs_are_pending_with_the_attempt_count_they_had(tmp_path: Path) -> None:
    queue = SqliteJobQueue.open(tmp_path / "queue.sqlite3")
    for uid in ("1", "2", "3"):
        record(queue, tmp_path, uid, [PACS])
    first, *rest = queue.claim(JobKind.FORWARD, target="pacs", limit=10)
    queue.retry_later(first, "tried and failed", delay=3600)
    queue.release(rest)
    queue.release(rest)  # twice is harmless: only running jobs are given back
    assert job_rows(queue.path) == {"1": ("pending", 1), "2": ("pending", 0), "3": ("pending", 0)}
    again = queue.claim(JobKind.FORWARD, target="pacs", limit=10)
    assert [(j.instance.sop_instance_uid, j.attempts) for j in again] == [("2", 1), ("3", 1)]
    queue.close()


def test_complete_many_names_only_instances_with_no_job_left(tmp_path: Path) -> None:
    queue = SqliteJobQueue.open(tmp_path / "queue.sqlite3")
    shared = record(queue, tmp_path, "1", [PACS, ARCHIVE])
    alone = record(queue, tmp_path, "2", [PACS])
    jobs = queue.claim(JobKind.FORWARD, target="pacs", limit=10)
    assert queue.complete_many([(job, "status 0x0000 (success)") for job in jobs]) == [alone]
    assert job_rows(queue.path) == {"1": ("done", 1)}  # its archive job still holds the rows
    (store,) = queue.claim(JobKind.STORE, limit=10)
    assert queue.complete(store, "stored") == shared
    assert job_rows(queue.path) == {}
    queue.close()


def test_completions_commit_then_delete_spool_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    queue = SqliteJobQueue.open(tmp_path / "queue.sqlite3")
    paths = [record(queue, spool.root, str(i), [PACS]) for i in range(40)]
    kept = record(queue, spool.root, "kept", [PACS, ARCHIVE])
    completions = Completions(queue, spool)
    completions.start()
    for job in queue.claim(JobKind.FORWARD, target="pacs", limit=100):
        completions.add(Delivery(job, "status 0x0000 (success)", warning=False, size=4))
    assert completions.flush(timeout=30)
    assert not any(path.exists() for path in paths)
    assert kept.exists()  # the archive job still needs it
    assert job_rows(queue.path) == {"kept": ("done", 1)}
    completions.stop()
    queue.close()


def test_an_unreachable_destination_costs_one_attempt_not_a_batch(tmp_path: Path) -> None:
    """A batch is claimed, the first C-STORE finds nobody listening: that job has one attempt,
    the others of its batch go back untried (attempts 0), and all wait for the hold."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    queue = SqliteJobQueue.open(tmp_path / "queue.sqlite3")
    count = CLAIM_BATCH // 2
    for i in range(count):
        record(queue, spool.root, f"{i:03d}", [PACS])
    retry = RetryPolicy(initial_delay=60, max_delay=60)
    pacs = DestinationConfig("pacs", "GONE", "127.0.0.1", free_port(), retry=retry)
    forwarder = Forwarder([pacs], NodeConfig(), queue, spool, DerivedFiles(spool.root, print))
    forwarder.start()
    try:
        assert wait_until(lambda: forwarder.workers[0].hold.streak == 1, timeout=20)
        time.sleep(0.5)  # a claim after the hold began would show up as a running job
    finally:
        forwarder.stop()
    rows = job_rows(queue.path)
    assert rows["000"] == ("pending", 1)
    assert {rows[f"{i:03d}"] for i in range(1, count)} == {("pending", 0)}
    with sqlite3.connect(queue.path) as db:
        (held,) = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE next_attempt_at > ?", (time.time() + 30,)
        ).fetchone()
    assert held == count  # every job waits for the end of the hold
    queue.close()
