"""Durability: a full disk is refused cleanly, and a kill -9 loses no acknowledged instance."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from tests.conftest import StartNode
from tests.corpus import CT_SMALL, copies_with_new_uids, corpus_dirs
from tests.storescu_profiles import send_as_is
from tests.support import BOTH_ACCEPTORS, NodeProcess, require_tool, storescu, wait_until
from tests.tools import missing_tool

OUT_OF_RESOURCES = 0xA700


def large_ct() -> Path:
    """A ~0.5 MB uncompressed CT (pydicom-data's 693_UNCR), else a 0.5 MB MR from pydicom."""
    for folder in corpus_dirs():
        found = folder / "693_UNCR.dcm"
        if found.exists():
            return found
    return corpus_dirs()[0] / "emri_small.dcm"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs, unmounted at teardown (after the node using it has been killed)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        missing_tool(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill the filesystem, then give back `leave` bytes; returns the filler file."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 16)
    # Unbuffered: a buffered file still holds the tail of a short write and raises ENOSPC
    # again when closed, unless the free space happened to be a whole number of chunks.
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def put_on(disk: Path, sections: dict[str, object]) -> None:
    """Spool, queue and storage root all on the small filesystem."""
    sections["node"]["data_dir"] = str(disk / "data")  # type: ignore[index]
    sections["storage"][0]["path"] = str(disk / "archive")  # type: ignore[index]


def leftovers(disk: Path) -> list[Path]:
    """Partial or staged files: none may survive a failed write."""
    spool = disk / "data" / "spool"
    incoming = disk / "archive" / ".incoming"
    partial = list(spool.rglob("*.part")) + [p for p in spool.rglob("*") if p.is_file()]
    staged = [p for p in incoming.rglob("*") if p.is_file()] if incoming.exists() else []
    return partial + staged


def archived(archive: Path) -> list[Path]:
    return [p for p in archive.rglob("*.dcm") if ".incoming" not in p.parts]


def store_status(node: NodeProcess, path: Path, workdir: Path) -> int:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    run = send_as_is(
        node.port, [path], str(ds.file_meta.TransferSyntaxUID), [str(ds.SOPClassUID)], workdir
    )
    assert path in run.statuses, run.output[-2000:]
    return run.statuses[path]


@BOTH_ACCEPTORS
def test_full_disk_answers_out_of_resources_and_recovers(
    small_disk: Path, start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node(lambda sections: put_on(small_disk, sections))
    big = large_ct()
    assert big.stat().st_size > 400_000
    # Room for the SQLite WAL to grow a little, but not for the instance: the spool
    # write fails half-way, which is the case that could leave a partial file.
    filler = fill(small_disk, leave=200_000)
    assert store_status(node, big, tmp_path) == OUT_OF_RESOURCES
    assert leftovers(small_disk) == []
    # Completely full: even the first bytes fail.
    fill(small_disk / "data", leave=0)
    assert store_status(node, CT_SMALL, tmp_path) == OUT_OF_RESOURCES
    assert leftovers(small_disk) == []
    assert archived(small_disk / "archive") == []
    assert "disk is full" in node.log()
    # Space freed: the same instances are stored normally.
    filler.unlink()
    (small_disk / "data" / "filler").unlink()
    assert store_status(node, big, tmp_path) == 0x0000
    assert store_status(node, CT_SMALL, tmp_path) == 0x0000
    assert wait_until(lambda: len(archived(small_disk / "archive")) == 2, timeout=30), node.log()
    assert wait_until(lambda: leftovers(small_disk) == [], timeout=10)
    assert node.alive()


def test_headroom_limit_refuses_before_the_disk_is_full(
    small_disk: Path, start_node: StartNode, tmp_path: Path
) -> None:
    def with_headroom(sections: dict[str, object]) -> None:
        put_on(small_disk, sections)
        sections["limits"] = {"min_free_space": 3 * 1024 * 1024}

    node = start_node(with_headroom)
    assert store_status(node, CT_SMALL, tmp_path) == 0x0000
    filler = fill(small_disk, leave=2 * 1024 * 1024)
    assert store_status(node, large_ct(), tmp_path) == OUT_OF_RESOURCES
    assert "min_free_space" in node.log()
    filler.unlink()
    assert store_status(node, large_ct(), tmp_path) == 0x0000


def fresh_copies(folder: Path, count: int) -> dict[str, Path]:
    """`count` copies of CT_small, keyed by their own SOP Instance UID."""
    return {path.stem: path for path in copies_with_new_uids(CT_SMALL, folder, count)}


def acknowledged_uids(run_output: str, copies: dict[str, Path]) -> set[str]:
    from tests.storescu_profiles import parse_output

    statuses, _ = parse_output(run_output, list(copies.values()))
    by_path = {path: uid for uid, path in copies.items()}
    return {by_path[path] for path, status in statuses.items() if status == 0x0000}


def archived_uids(archive: Path) -> list[str]:
    return [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in archived(archive)
    ]


def queue_duplicates(data_dir: Path) -> list[tuple[str, int]]:
    """SOP Instance UIDs with more than one open job per storage in the queue."""
    with sqlite3.connect(data_dir / "queue.sqlite3") as db:
        return db.execute(
            "SELECT instances.sop_instance_uid, COUNT(*) FROM jobs"
            " JOIN instances ON instances.id = jobs.instance_id"
            " WHERE jobs.kind = 'store' GROUP BY instances.sop_instance_uid, jobs.target"
            " HAVING COUNT(*) > 1"
        ).fetchall()


def restart_and_drain(node: NodeProcess, tmp_path: Path, expected: set[str]) -> list[str]:
    node.start()
    archive = tmp_path / "archive"
    drained = wait_until(lambda: expected <= set(archived_uids(archive)), timeout=60)
    assert drained, f"{len(expected - set(archived_uids(archive)))} lost:\n{node.log()[-3000:]}"
    uids = archived_uids(archive)
    assert node.stop() == 0, node.log()
    return uids


@BOTH_ACCEPTORS
def test_kill_9_right_after_acknowledgement_loses_nothing(
    start_node: StartNode, tmp_path: Path
) -> None:
    copies = fresh_copies(tmp_path / "outgoing", 40)
    node = start_node()
    sent = storescu(node.port, list(copies.values()), "-d", "-nh")
    node.kill()  # SIGKILL the moment storescu returns
    acked = acknowledged_uids(sent.stdout + sent.stderr, copies)
    assert len(acked) == len(copies), sent.stderr[-2000:]
    assert queue_duplicates(tmp_path / "data") == []
    uids = restart_and_drain(node, tmp_path, acked)
    assert acked <= set(uids)
    assert len(uids) == len(set(uids)), "an instance was stored twice"


def stored_in(syntax: str | None):  # type: ignore[no-untyped-def]
    def edit(sections: dict[str, object]) -> None:
        if syntax:
            sections["storage"][0]["transfer_syntax"] = syntax  # type: ignore[index]

    return edit


# As received, workers keep up with intake; transcoding to JPEG 2000 makes them
# slower than the sender, so the kill finds a backlog of acknowledged instances.
@pytest.mark.parametrize("syntax", [None, "JPEG2000Lossless"], ids=["as-received", "j2k"])
def test_kill_9_while_store_workers_are_busy_loses_nothing(
    start_node: StartNode, tmp_path: Path, syntax: str | None
) -> None:
    copies = fresh_copies(tmp_path / "outgoing", 150)
    node = start_node(stored_in(syntax))
    archive = tmp_path / "archive"
    # storescu -d writes a lot: into a file, so a full pipe never stalls it.
    transcript = (tmp_path / "storescu.txt").open("w+")
    sender = subprocess.Popen(
        [
            require_tool("storescu"),
            "-d",
            "-nh",
            "-aec",
            "DICOMNODE",
            "127.0.0.1",
            str(node.port),
            *map(str, copies.values()),
        ],
        stdout=transcript,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    # Kill once the workers have stored some instances but not all of them.
    stored_some = wait_until(lambda: len(archived(archive)) >= 10, timeout=60, interval=0.01)
    assert stored_some, node.log()[-3000:]
    node.signal(signal.SIGKILL)
    sender.wait(timeout=60)
    transcript.close()
    output = (tmp_path / "storescu.txt").read_text()
    node.process.wait(10)  # type: ignore[union-attr]
    acked = acknowledged_uids(output, copies)
    assert len(acked) >= 10, output[-2000:]
    stored_before = len(archived(archive))
    assert queue_duplicates(tmp_path / "data") == []
    time.sleep(0.1)
    uids = restart_and_drain(node, tmp_path, acked)
    missing = acked - set(uids)
    assert not missing, f"{len(missing)} acknowledged instances lost; log:\n{node.log()[-3000:]}"
    assert len(uids) == len(set(uids)), "an instance was stored twice"
    print(f"\nkill -9 mid-way: {len(acked)} acknowledged, {stored_before} stored before the kill")


def test_stored_file_is_complete_after_kill(start_node: StartNode, tmp_path: Path) -> None:
    """No half-written file in the archive or the spool after a kill -9 and a restart."""
    copies = fresh_copies(tmp_path / "outgoing", 30)
    node = start_node()
    storescu(node.port, list(copies.values()), "-nh")
    node.kill()
    restart_and_drain(node, tmp_path, set(copies))
    for path in archived(tmp_path / "archive"):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert len(ds.PixelData) == 128 * 128 * 2
    assert list((tmp_path / "data" / "spool").glob("*.part")) == []
    assert [p for p in (tmp_path / "archive" / ".incoming").iterdir() if p.is_file()] == []


def test_leftovers_of_a_crash_are_dropped_at_start(start_node: StartNode, tmp_path: Path) -> None:
    """A partial spool file, and a complete one the queue never recorded (so never acknowledged),
    are removed at start-up; neither reaches the archive."""
    node = start_node()
    assert node.stop() == 0
    spool = tmp_path / "data" / "spool"
    (spool / "0123abcd.part").write_bytes(CT_SMALL.read_bytes()[:1000])
    (spool / "4567cdef.dcm").write_bytes(CT_SMALL.read_bytes())
    node.start()
    assert wait_until(lambda: [p for p in spool.iterdir() if p.is_file()] == [], timeout=10)
    assert archived(tmp_path / "archive") == []
    assert node.stop() == 0
