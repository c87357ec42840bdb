"""Storage as received: the fsynced spool file is hard-linked into place (copied onto another
filesystem), the layout comes from what intake recorded, and folder fsyncs and commits are
batched, without giving up an acknowledged instance or the duplicates policy."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.config.model import StorageConfig
from node.ingest.spool import Spool
from node.jobs.jobqueue import SqliteJobQueue
from node.jobs.model import Job, JobKind, JobSpec, ReceivedInstance
from node.store import commits, workers
from node.store.commits import Placed, StoredCommits
from node.store.targets import PlacedInstance, Placement, StorageTarget
from node.store.workers import StoreWorkers
from tests.conftest import StartNode
from tests.corpus import CT_SMALL, copies_with_new_uids, dataset_bytes
from tests.store.test_foundation_durability import acknowledged_uids, archived
from tests.support import require_tool, wait_until

LAYOUT = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


def same_instance(stored: Path, sent: Path) -> bool:
    """The same elements and pixels, as storescu sends a file: without its trailing padding."""
    ours, theirs = pydicom.dcmread(stored), pydicom.dcmread(sent)
    padding = 0xFFFCFFFC
    return [(e.tag, e.value) for e in ours] == [
        (e.tag, e.value) for e in theirs if e.tag != padding
    ]


@pytest.fixture
def other_filesystem() -> Iterator[Path]:
    """A folder on /dev/shm (tmpfs): another filesystem than the test's spool."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="node-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def spooled_file(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.dcm"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("where", ["same filesystem", "tmpfs"])
@pytest.mark.parametrize("policy", ["overwrite", "keep", "reject"])
def test_placing_the_spool_file_follows_the_duplicates_policy(
    tmp_path: Path, other_filesystem: Path, where: str, policy: str
) -> None:
    root = tmp_path / "archive" if where == "same filesystem" else other_filesystem / "archive"
    target = StorageTarget(StorageConfig("archive", root, duplicates=policy))  # type: ignore[arg-type]
    target.prepare()
    spool = tmp_path / "spool"
    first, second = spooled_file(spool, b"first"), spooled_file(spool, b"second")
    final = root / "P" / "1.2.3.dcm"

    placed = target.place(first, final, keep_source=True)
    assert placed.placement == Placement.STORED
    assert final.read_bytes() == b"first" and first.read_bytes() == b"first"  # linked, not moved
    same_inode = os.stat(final).st_ino == os.stat(first).st_ino
    assert same_inode is (where == "same filesystem")  # a hard link where one can be made

    again = target.place(second, final, keep_source=True)
    expected = b"second" if policy == "overwrite" else b"first"
    assert again.placement == (
        Placement.OVERWRITTEN if policy == "overwrite" else Placement.KEPT_EXISTING
    )
    assert final.read_bytes() == expected
    assert second.read_bytes() == b"second"  # the spool file is never touched
    assert [p for p in (root / ".incoming").iterdir()] == []  # no staged copy left behind


def recorded_job(queue: SqliteJobQueue, spool: Spool, header_values: bool) -> Job:
    """CT_small spooled and recorded as intake does, with or without its layout values."""
    ds = pydicom.dcmread(CT_SMALL)
    data = dataset_bytes(CT_SMALL)
    from node.ingest.spool import part10_header

    meta = part10_header(CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, "CT")
    spooled = spool.write(meta, data)
    values = (
        (
            ("PatientID", str(ds.PatientID)),
            ("StudyInstanceUID", str(ds.StudyInstanceUID)),
            ("SeriesInstanceUID", str(ds.SeriesInstanceUID)),
            ("SOPInstanceUID", str(ds.SOPInstanceUID)),
        )
        if header_values
        else ()
    )
    instance = ReceivedInstance(
        str(ds.SOPInstanceUID),
        CTImageStorage,
        ExplicitVRLittleEndian,
        "CT",
        "NODE",
        spooled.path,
        spooled.size,
        header_values=values,
    )
    queue.record_instance(instance, [JobSpec(JobKind.STORE, "archive")])
    (job,) = queue.claim(JobKind.STORE, limit=1)
    return job


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "older-record"])
def test_the_store_worker_parses_the_file_only_without_recorded_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: bool
) -> None:
    parsed: list[Path] = []
    real = workers.read_file_header
    monkeypatch.setattr(workers, "read_file_header", lambda p: parsed.append(p) or real(p))
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    queue = SqliteJobQueue.open(tmp_path / "queue.sqlite3")
    target = StorageTarget(StorageConfig("archive", tmp_path / "archive", layout=LAYOUT))
    target.prepare()
    store = StoreWorkers(queue, spool, {"archive": target})
    store.commits.start()
    job = recorded_job(queue, spool, header_values=recorded)
    store.run(job)
    assert store.commits.flush(timeout=30)
    ds = pydicom.dcmread(CT_SMALL)
    expected = (
        tmp_path
        / "archive"
        / str(ds.PatientID)
        / str(ds.StudyInstanceUID)
        / str(ds.SeriesInstanceUID)
        / f"{ds.SOPInstanceUID}.dcm"
    )
    assert archived(tmp_path / "archive") == [expected]
    assert parsed == ([] if recorded else [job.instance.spool_path])
    assert queue.stored_path("archive", str(ds.SOPInstanceUID)) == expected
    assert not job.instance.spool_path.exists()  # the instance is done: its spool name goes
    store.commits.stop()
    queue.close()


def test_a_batch_fsyncs_each_folder_once_before_its_one_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    monkeypatch.setattr(commits, "fsync_directory", lambda folder: events.append(folder.name))

    class Queue:
        def complete_stored_many(self, done: list[tuple[Job, Path, str]]) -> list[Path]:
            events.append(f"commit {len(done)}")
            return []

    batcher = StoredCommits(Queue(), Spool(tmp_path / "spool"), retry=print)  # type: ignore[arg-type]
    for index in range(30):
        folder = tmp_path / ("series-a" if index % 3 else "series-b")
        job = Job(index, JobKind.STORE, "archive", 1, index, None)  # type: ignore[arg-type]
        placed = PlacedInstance(folder / f"{index}.dcm", Placement.STORED, unsynced_folder=folder)
        batcher.add(Placed(job, placed, ExplicitVRLittleEndian, ""))
    monkeypatch.setattr(commits, "_count_and_log", lambda placed: None)
    batcher.start()
    assert batcher.flush(timeout=30)
    batcher.stop()
    # Nothing counts as stored before its folder is on disk: the fsyncs come first.
    assert events == ["series-b", "series-a", "commit 30"]


def test_kill_9_with_hard_linked_storage_loses_nothing(
    start_node: StartNode, tmp_path: Path
) -> None:
    """The stored files are the spool files' inodes; a kill -9 mid-stream, a restart, and
    every acknowledged instance is stored once, byte for byte as it was sent."""
    copies = {path.stem: path for path in copies_with_new_uids(CT_SMALL, tmp_path / "out", 150)}
    node = start_node()
    archive, spool = tmp_path / "archive", tmp_path / "data" / "spool"
    transcript = (tmp_path / "storescu.txt").open("w+")
    sender = subprocess.Popen(
        [
            *(require_tool("storescu"), "-d", "-nh", "-aec", "DICOMNODE", "127.0.0.1"),
            *(str(node.port), *map(str, copies.values())),
        ],
        stdout=transcript,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert wait_until(lambda: len(archived(archive)) >= 10, timeout=60, interval=0.01)
    node.signal(signal.SIGKILL)
    sender.wait(timeout=60)
    transcript.close()
    node.process.wait(10)  # type: ignore[union-attr]
    acked = acknowledged_uids((tmp_path / "storescu.txt").read_text(), copies)
    assert len(acked) >= 10
    # (That the stored file is the spool file's inode, not a copy, is held by
    # test_placing_the_spool_file_follows_the_duplicates_policy: archive and spool share
    # a filesystem here.)
    assert os.stat(archive).st_dev == os.stat(spool).st_dev
    node.start()
    assert wait_until(lambda: len(archived(archive)) >= len(acked), timeout=60), node.log()
    assert wait_until(lambda: list(spool.glob("*.dcm")) == [], timeout=30), node.log()
    assert node.stop() == 0
    by_uid = {p.stem: p for p in archived(archive)}
    lost = acked - set(by_uid)
    assert not lost, f"{len(lost)} acknowledged instances lost"
    assert len(by_uid) == len(archived(archive)), "an instance was stored twice"
    for uid in acked:
        assert same_instance(by_uid[uid], copies[uid])
        assert os.stat(by_uid[uid]).st_nlink == 1  # the spool's name is gone, the file stays


def test_storage_on_another_filesystem_is_copied_complete(
    start_node: StartNode, tmp_path: Path, other_filesystem: Path
) -> None:
    copies = {path.stem: path for path in copies_with_new_uids(CT_SMALL, tmp_path / "out", 20)}
    archive = other_filesystem / "archive"

    def on_tmpfs(sections: dict[str, object]) -> None:
        sections["storage"] = [{"name": "archive", "path": str(archive)}]

    node = start_node(on_tmpfs)
    from tests.support import storescu

    sent = storescu(node.port, list(copies.values()))
    assert sent.returncode == 0, sent.stderr
    assert wait_until(lambda: len(archived(archive)) == 20, timeout=60), node.log()
    spool = tmp_path / "data" / "spool"
    assert wait_until(lambda: list(spool.glob("*.dcm")) == [], timeout=30), node.log()
    assert node.stop() == 0
    assert os.stat(archive).st_dev != os.stat(spool).st_dev
    for path in archived(archive):
        assert same_instance(path, copies[path.stem])
    assert [p for p in (archive / ".incoming").iterdir()] == []
