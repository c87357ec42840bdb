"""What only a shared PostgreSQL queue has: several nodes, SKIP LOCKED claims, leases that
expire when a node dies, migrations applied once, and a server that would lose commits."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.jobs.backends import QueueSettings, open_queue
from node.jobs.commitments import CommitmentItem, Direction, NewCommitment
from node.jobs.interface import JobQueue
from node.jobs.model import GroupMembership, JobKind, JobSpec, ReceivedInstance
from node.jobs.postgres import PostgresDatabase, PostgresSettings, UnsafeServer
from node.jobs.postgres_reports import PostgresQueueOperations
from node.jobs.postgres_schema import all_migrations
from tests.jobs.conftest import QueueBackend
from tests.jobs.test_groups import STUDY
from tests.jobs.test_queue_contract import ARCHIVE, PACS, record

ON_POSTGRES = pytest.mark.parametrize("queue_backend", ["postgresql"], indirect=True)


@ON_POSTGRES
def test_nodes_claiming_at_once_never_take_the_same_job(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    for index in range(120):
        record(queue_backend.queue, tmp_path, f"1.2.{index}", [PACS])
    nodes = [queue_backend.opened] + [
        queue_backend.another_node(f"node-{n}", shared_spool=True) for n in "bc"
    ]
    # node-a's own queue claims only its own jobs; b and c read a shared spool.
    claimed: dict[str, list[int]] = {}
    start = threading.Barrier(3)

    def drain(name: str, opened: object) -> None:
        queue = opened.queue  # type: ignore[attr-defined]
        start.wait()
        mine: list[int] = []
        while jobs := queue.claim(JobKind.FORWARD, limit=7):
            mine += [job.id for job in jobs]
        claimed[name] = mine

    threads = [
        threading.Thread(target=drain, args=(f"n{i}", opened)) for i, opened in enumerate(nodes)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = [job for jobs in claimed.values() for job in jobs]
    assert len(every) == 120 and len(set(every)) == 120, "a job was claimed twice"
    assert sum(1 for jobs in claimed.values() if jobs) >= 2, claimed  # they really raced


@ON_POSTGRES
def test_a_shared_nothing_node_runs_only_the_jobs_its_spool_holds(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    record(queue_backend.queue, tmp_path, "1.2.1", [ARCHIVE])
    other = queue_backend.another_node("node-b")
    assert other.queue.claim(JobKind.STORE) == []
    assert other.queue.next_due_in(JobKind.STORE) is None
    assert other.queue.spool_paths() == set()
    # The cluster's reports see it from any node.
    assert [(r.target, r.count) for r in other.reports.report()] == [("archive", 1)]
    assert other.queue.is_known("archive", "1.2.1")
    (job,) = queue_backend.queue.claim(JobKind.STORE)
    assert job.instance.sop_instance_uid == "1.2.1"


@ON_POSTGRES
def test_a_dead_nodes_leases_expire_and_its_jobs_go_back_to_the_queue(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    dying = queue_backend.another_node("node-dead", lease=1.0, shared_spool=True)
    record(dying.queue, tmp_path, "1.2.1", [ARCHIVE])
    record(dying.queue, tmp_path, "1.2.2", [ARCHIVE])
    assert len(dying.queue.claim(JobKind.STORE)) == 2
    # SIGKILL: no requeue, no more heartbeats. Stopping the heartbeat thread is all it takes.
    database = dying.queue.database  # type: ignore[attr-defined]
    database._stopping.set()
    database._heartbeat.join(5)
    survivor = queue_backend.another_node("node-b", lease=1.0, shared_spool=True)
    assert survivor.queue.claim(JobKind.STORE) == [], "jobs under a live lease were taken"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        survivor.queue.database.heartbeat()  # type: ignore[attr-defined]
        taken = survivor.queue.claim(JobKind.STORE)
        if taken:
            break
        time.sleep(0.2)
    assert sorted(j.instance.sop_instance_uid for j in taken) == ["1.2.1", "1.2.2"]
    assert all(j.attempts == 2 for j in taken)
    nodes = {n.name: n for n in PostgresQueueOperations(database).nodes()}
    assert nodes["node-b"].running_jobs == 2 and nodes["node-dead"].running_jobs == 0


@ON_POSTGRES
def test_a_live_node_keeps_its_leases(queue_backend: QueueBackend, tmp_path: Path) -> None:
    alive = queue_backend.another_node("node-slow", lease=0.6, shared_spool=True)
    record(alive.queue, tmp_path, "1.2.1", [ARCHIVE])
    (job,) = alive.queue.claim(JobKind.STORE)
    other = queue_backend.another_node("node-b", lease=0.6, shared_spool=True)
    deadline = time.monotonic() + 2.5  # four leases long: its heartbeat renews every 0.2 s
    while time.monotonic() < deadline:
        other.queue.database.heartbeat()  # type: ignore[attr-defined]
        assert other.queue.claim(JobKind.STORE) == [], "a live node's job was taken"
        time.sleep(0.1)
    assert alive.queue.complete(job, "stored") == job.instance.spool_path


@ON_POSTGRES
def test_requeue_running_returns_only_this_nodes_claims(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    other = queue_backend.another_node("node-b", shared_spool=True)
    record(queue_backend.queue, tmp_path, "1.2.1", [ARCHIVE])
    record(queue_backend.queue, tmp_path, "1.2.2", [ARCHIVE])
    assert len(queue_backend.queue.claim(JobKind.STORE, limit=1)) == 1
    assert len(other.queue.claim(JobKind.STORE, limit=1)) == 1
    assert other.queue.requeue_running() == 1
    assert {(r.state, r.count) for r in other.reports.report()} == {("running", 1), ("pending", 1)}


@ON_POSTGRES
def test_the_last_two_jobs_completed_on_two_nodes_at_once_finish_the_instance(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    other = queue_backend.another_node("node-b", shared_spool=True)
    for index in range(40):
        record(
            queue_backend.queue, tmp_path, f"1.2.{index}", [PACS, JobSpec(JobKind.FORWARD, "vna")]
        )
    pacs = queue_backend.queue.claim(JobKind.FORWARD, target="pacs", limit=40)
    vna = other.queue.claim(JobKind.FORWARD, target="vna", limit=40)
    finished: list[Path] = []
    barrier = threading.Barrier(2)

    def complete(queue: object, jobs: list) -> None:  # type: ignore[type-arg]
        barrier.wait()
        for job in jobs:
            if queue.complete(job, "0x0000") is not None:  # type: ignore[attr-defined]
                finished.append(job.instance.spool_path)

    threads = [
        threading.Thread(target=complete, args=(queue_backend.queue, pacs)),
        threading.Thread(target=complete, args=(other.queue, vna)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(finished) == 40 and len(set(finished)) == 40
    assert queue_backend.rows("SELECT COUNT(*) FROM instances") == [(0,)]


def test_migrations_are_applied_once_when_nodes_start_together(postgres_dsn: str) -> None:
    databases: list[PostgresDatabase] = []
    errors: list[BaseException] = []

    def start(name: str) -> None:
        try:
            databases.append(PostgresDatabase(PostgresSettings(postgres_dsn, name), claims=False))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(f"n{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == []
        rows = databases[0].execute("SELECT id FROM schema_migrations ORDER BY id")
        assert [row[0] for row in rows] == sorted(m[0] for m in all_migrations())
    finally:
        for database in databases:
            database.close()


def test_a_server_that_would_lose_acknowledged_commits_is_refused(
    postgres_dsn: str, tmp_path: Path
) -> None:
    dsn_file = tmp_path / "pg.dsn"
    dsn_file.write_text(postgres_dsn.replace("options='", "options='-csynchronous_commit=off "))
    settings = QueueSettings("postgresql", tmp_path / "q.sqlite3", "n", dsn_file=dsn_file)
    with pytest.raises(UnsafeServer, match="synchronous_commit = off"):
        open_queue(settings)
    with psycopg.connect(postgres_dsn) as connection:  # nothing was created on such a server
        assert connection.execute("SELECT to_regclass('jobs')").fetchone() == (None,)


def record_study_member(queue: JobQueue, folder: Path, study: str, number: int) -> None:
    uid = f"{study}.{number}.{uuid.uuid4().int % 10**12}"
    spooled = folder / f"{uid}.dcm"
    spooled.write_bytes(b"dicm")
    membership = GroupMembership(
        trigger=STUDY,
        study_instance_uid=study,
        series_instance_uid="",
        member_series_uid=f"{study}.1",
        series_number=1,
        instance_number=number,
    )
    instance = ReceivedInstance(uid, CTImageStorage, ExplicitVRLittleEndian, "CT", "N", spooled, 4)
    queue.record_instance(instance, [JobSpec(JobKind.FORWARD, "ai", group=membership)])


@ON_POSTGRES
def test_a_study_arriving_on_two_nodes_at_once_joins_one_group(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    """Without the lock on the group's key both nodes would start version 1 of a new study
    at once (and one would fail on the unique key and refuse its instance)."""
    other = queue_backend.another_node("node-b")
    queues = [queue_backend.queue, other.queue]
    studies = [f"1.2.826.0.1.3680043.10.77.{n}" for n in range(25)]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def send(index: int) -> None:
        for study in studies:  # each study's first instance on both nodes at the same moment
            start.wait()
            try:
                for number in range(2):
                    record_study_member(queues[index], tmp_path, study, 2 * number + index)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=send, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    found = queue_backend.queue.waiting_groups()
    assert sorted((g.study_instance_uid, g.version, g.members) for g in found) == [
        (study, 1, 4) for study in sorted(studies)
    ]
    group = found[0]
    assert queue_backend.queue.dispatch_group(group.id, "stable")
    # Each node claims the members its own spool holds, and only those.
    for queue, name in ((queue_backend.queue, "node-a"), (other.queue, "node-b")):
        claim = queue.claim_group(JobKind.FORWARD, "ai")
        assert claim is not None and len(claim.jobs) == 2
        owners = queue_backend.rows(
            "SELECT DISTINCT node FROM jobs WHERE id IN ("
            + ", ".join(str(job.id) for job in claim.jobs)
            + ")"
        )
        assert owners == [(name,)]
        assert queue.claim_group(JobKind.FORWARD, "ai") is None


@ON_POSTGRES
def test_a_dead_nodes_group_members_wait_for_their_group_again(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    dying = queue_backend.another_node("node-dead", lease=1.0, shared_spool=True)
    study = "1.2.826.0.1.3680043.10.78"
    for number in range(3):
        record_study_member(dying.queue, tmp_path, study, number)
    (group,) = dying.queue.waiting_groups()
    assert dying.queue.dispatch_group(group.id, "stable")
    claim = dying.queue.claim_group(JobKind.FORWARD, "ai")
    assert claim is not None and len(claim.jobs) == 3
    database = dying.queue.database  # type: ignore[attr-defined]
    database._stopping.set()  # SIGKILL: its heartbeat stops
    database._heartbeat.join(5)
    survivor = queue_backend.another_node("node-b", lease=1.0, shared_spool=True)
    assert survivor.queue.claim_group(JobKind.FORWARD, "ai") is None
    deadline = time.monotonic() + 20
    taken = None
    while taken is None and time.monotonic() < deadline:
        survivor.queue.database.heartbeat()  # type: ignore[attr-defined]
        taken = survivor.queue.claim_group(JobKind.FORWARD, "ai")
        time.sleep(0.2)
    assert taken is not None, "the dead node's group members never came back"
    assert [job.id for job in taken.jobs] == [job.id for job in claim.jobs]
    assert survivor.queue.claim(JobKind.FORWARD) == [], "a group member went out on its own"


@ON_POSTGRES
def test_a_request_is_reported_by_the_node_that_received_it(
    queue_backend: QueueBackend, tmp_path: Path
) -> None:
    """Every node's reporter reads the open requests: each must see only its own, or a peer
    would get the same N-EVENT-REPORT from two nodes."""
    other = queue_backend.another_node("node-b")
    item = CommitmentItem("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")
    asked = NewCommitment(Direction.REQUESTED, "2.25.77", "CT01", "NODE", 9e9, (item,))
    mine = queue_backend.opened.commitments.record_commitment(asked)
    assert [
        c.id for c in queue_backend.opened.commitments.open_commitments(Direction.REQUESTED)
    ] == [mine]
    assert other.commitments.open_commitments(Direction.REQUESTED) == []
    sent = NewCommitment(Direction.SENT, "2.25.78", "pacs", "NODE", 9e9, (item,))
    theirs = other.commitments.record_commitment(sent)
    # A destination's report may reach any node: the commitments we sent are everyone's.
    assert [c.id for c in queue_backend.opened.commitments.open_commitments(Direction.SENT)] == [
        theirs
    ]


@ON_POSTGRES
def test_a_commit_whose_answer_was_lost_is_found_not_reported_as_failed(
    queue_backend: QueueBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Intake deletes the spool file when recording fails: a commit that happened must not be
    reported as a failure, or its jobs would run without their file."""
    database = queue_backend.queue.database  # type: ignore[attr-defined]
    real = database.execute

    def commit_then_lose_the_answer(query: str, params: object = ()) -> object:
        rows = real(query, params)
        if query.lstrip().startswith("WITH instance AS"):
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return rows

    monkeypatch.setattr(database, "execute", commit_then_lose_the_answer)
    record(queue_backend.queue, tmp_path, "1.2.1", [ARCHIVE])  # no exception: it is there
    monkeypatch.undo()
    assert queue_backend.rows("SELECT COUNT(*) FROM instances") == [(1,)]

    def lose_it_before_the_commit(query: str, params: object = ()) -> object:
        if query.lstrip().startswith("WITH instance AS"):
            raise psycopg.OperationalError("could not connect to server")
        return real(query, params)

    monkeypatch.setattr(database, "execute", lose_it_before_the_commit)
    with pytest.raises(psycopg.OperationalError):
        record(queue_backend.queue, tmp_path, "1.2.2", [ARCHIVE])
