"""The forwarder's decisions, without a network: status classes, backoff, proposals, the
decode-once cache and the queue's operator operations."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from node.cli.main import main as cli_main
from node.config.model import DestinationConfig, RetryPolicy
from node.dicom.syntaxes import resolve_syntax
from node.forward.derived import DerivedFiles, Untranscodable
from node.forward.forwarder import (
    Proposal,
    RetrySchedule,
    Verdict,
    classify_status,
    describe_status,
    proposed_syntaxes,
    sending_order,
)
from node.ingest.spool import Spool
from node.jobs.interface import JobQueue
from node.jobs.jobqueue import SqliteJobQueue
from node.jobs.model import JobKind, JobSpec, JobState, ReceivedInstance
from node.jobs.reports import SqliteQueueOperations
from node.net.pdu import MAX_PRESENTATION_CONTEXTS as MAX_CONTEXTS
from node.transcode import Outcome, transcode_file
from tests.corpus import find


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (0x0000, Verdict.DELIVERED),
        (0xB000, Verdict.DELIVERED),
        (0xB006, Verdict.DELIVERED),
        (0xB007, Verdict.DELIVERED),
        (0x0111, Verdict.DELIVERED),
        (0xA700, Verdict.RETRY),
        (0xA7FF, Verdict.RETRY),
        (0x0110, Verdict.RETRY),
        (0x0122, Verdict.REFUSED),
        (0x0124, Verdict.REFUSED),
        (0xA900, Verdict.REFUSED),
        (0xA9AB, Verdict.REFUSED),
        (0xC000, Verdict.REFUSED),
        (0xC210, Verdict.REFUSED),
        (0x1234, Verdict.REFUSED),
    ],
)
def test_c_store_status_classes(code: int, verdict: Verdict) -> None:
    assert classify_status(code) is verdict


def test_status_description_names_the_class() -> None:
    assert describe_status(0x0122) == "status 0x0122 (SOP class not supported)"
    assert describe_status(0xA701) == "status 0xA701 (out of resources)"
    assert describe_status(0xC123) == "status 0xC123 (cannot understand)"


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    schedule = RetrySchedule(RetryPolicy(initial_delay=2, max_delay=30, max_attempts=0))
    for attempts, base in [(1, 2), (2, 4), (3, 8), (4, 16), (5, 30), (20, 30)]:
        delays = [schedule.delay(attempts) for _ in range(200)]
        assert all(0.8 * base <= d <= base for d in delays), (attempts, min(delays), max(delays))
        assert len(set(delays)) > 100  # jittered, not in lockstep
    assert not schedule.gives_up(10_000)  # 0 = forever
    limited = RetrySchedule(RetryPolicy(initial_delay=1, max_delay=5, max_attempts=3))
    assert not limited.gives_up(2) and limited.gives_up(3)


def test_proposal_is_preferred_then_received_then_explicit_little_endian() -> None:
    destination = DestinationConfig(
        "pacs", "PACS", "127.0.0.1", 104, transfer_syntaxes=("JPEGLSLossless", "RLELossless")
    )
    assert proposed_syntaxes(destination, JPEG2000Lossless) == [
        JPEGLSLossless,
        RLELossless,
        JPEG2000Lossless,
        ExplicitVRLittleEndian,
    ]
    assert proposed_syntaxes(destination, RLELossless) == [
        JPEGLSLossless,
        RLELossless,
        ExplicitVRLittleEndian,
    ]


def test_lossy_instances_go_as_received_when_accepted_others_by_preference() -> None:
    wanted = [JPEGLSLossless, JPEGBaseline8Bit, ExplicitVRLittleEndian]
    everything = set(wanted)
    assert sending_order(wanted, everything, JPEGBaseline8Bit) == [
        JPEGBaseline8Bit,
        JPEGLSLossless,
        ExplicitVRLittleEndian,
    ]
    assert sending_order(wanted, {ExplicitVRLittleEndian}, JPEGBaseline8Bit) == [
        ExplicitVRLittleEndian
    ]
    native = [JPEGLSLossless, ExplicitVRLittleEndian]
    assert sending_order(native, set(native), ExplicitVRLittleEndian) == native


def test_proposal_grows_per_sop_class_and_starts_over_past_128_contexts() -> None:
    proposal = Proposal().with_class(CTImageStorage, [ExplicitVRLittleEndian])
    assert proposal.covers(CTImageStorage, [ExplicitVRLittleEndian])
    assert not proposal.covers(CTImageStorage, [JPEG2000Lossless])
    proposal = proposal.with_class(CTImageStorage, [JPEG2000Lossless])
    assert proposal.covers(CTImageStorage, [ExplicitVRLittleEndian, JPEG2000Lossless])
    for index in range(MAX_CONTEXTS):
        proposal = proposal.with_class(f"1.2.3.{index}", [ExplicitVRLittleEndian])
        assert sum(len(s) for s in proposal.syntaxes.values()) <= MAX_CONTEXTS
    assert not proposal.covers(CTImageStorage, [ExplicitVRLittleEndian])


class CountingTranscoder:
    """The real engine, in-process, remembering every source it had to read."""

    def __init__(self) -> None:
        self.sources: list[Path] = []

    def __call__(self, src: Path, dst: Path, ladder: list, *, allow_lossy: bool = False) -> Outcome:
        self.sources.append(Path(src))
        return transcode_file(src, dst, ladder, allow_lossy=allow_lossy)


def spooled_copy(tmp_path: Path, name: str) -> Path:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    return Path(shutil.copy(find(name), spool / "0123abcd.dcm"))


def test_a_compressed_instance_is_decoded_once_for_every_destination_syntax(
    tmp_path: Path,
) -> None:
    source = spooled_copy(tmp_path, "MR_small_jp2klossless.dcm")
    transcoder = CountingTranscoder()
    # One lock stripe: every derived file shares it, so a nested acquisition would hang.
    derived = DerivedFiles(source.parent, transcoder, stripes=1)
    derived.prepare()
    wanted = ["JPEGLSLossless", "ExplicitVRLittleEndian", "RLELossless", "JPEGLSLossless"]
    paths = [derived.get(source, JPEG2000Lossless, target) for target in wanted]
    assert transcoder.sources.count(source) == 1  # one decode of the JPEG 2000 stream
    assert len(transcoder.sources) == 3  # EVLE, JPEG-LS, RLE; the 2nd JPEG-LS is reused
    original = pydicom.dcmread(source).pixel_array
    for path, target in zip(paths, wanted, strict=True):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == resolve_syntax(target)
        assert np.array_equal(ds.pixel_array, original)
    assert derived.get(source, JPEG2000Lossless, "JPEG2000Lossless") == source

    Spool(source.parent).remove(source)  # the spool file takes its derived files along
    assert not list(derived.folder.iterdir())


def test_an_impossible_transcode_is_refused_with_the_reason_and_not_retried(
    tmp_path: Path,
) -> None:
    source = spooled_copy(tmp_path, "SC_rgb_32bit.dcm")  # 32-bit RGB: no JPEG-LS encoder
    transcoder = CountingTranscoder()
    derived = DerivedFiles(source.parent, transcoder)
    derived.prepare()
    for _ in range(2):
        with pytest.raises(Untranscodable, match="JPEGLSLossless"):
            derived.get(source, ExplicitVRLittleEndian, "JPEGLSLossless")
    assert len(transcoder.sources) == 1
    assert not derived.path_for(source, JPEGLSLossless).exists()


def test_orphaned_derived_files_are_swept_at_start(tmp_path: Path) -> None:
    source = spooled_copy(tmp_path, "CT_small.dcm")
    derived = DerivedFiles(source.parent, CountingTranscoder())
    derived.prepare()
    kept = derived.path_for(source, RLELossless)
    orphan = derived.folder / f"ffff0000.{RLELossless}.dcm"
    partial = derived.folder / f".{kept.name}.x1y2.tmp"
    for path in (kept, orphan, partial):
        path.write_bytes(b"x")
    derived.prepare()
    assert kept.exists() and not orphan.exists() and not partial.exists()


def record(queue: JobQueue, spool: Path, uid: str, targets: list[JobSpec]) -> Path:
    path = spool / f"{uid}.dcm"
    path.write_bytes(b"dicm")
    instance = ReceivedInstance(uid, CTImageStorage, ExplicitVRLittleEndian, "A", "B", path, 4)
    queue.record_instance(instance, targets)
    return path


def test_purge_keeps_spool_files_other_jobs_still_need(tmp_path: Path) -> None:
    queue = SqliteJobQueue.open(tmp_path / "queue.sqlite3")
    operations = SqliteQueueOperations(queue.database)
    pacs, archive = JobSpec(JobKind.FORWARD, "pacs"), JobSpec(JobKind.STORE, "archive")
    shared = record(queue, tmp_path, "1", [pacs, archive])
    alone = record(queue, tmp_path, "2", [pacs])
    for job in queue.claim(JobKind.FORWARD, target="pacs", limit=10):
        queue.dead_letter(job, "status 0x0122 (SOP class not supported)")
    assert operations.purgeable(JobKind.FORWARD, "pacs", [JobState.FAILED]) == 2

    count, finished = operations.purge(JobKind.FORWARD, "pacs", [JobState.FAILED])
    assert count == 2
    assert finished == [alone]  # instance 1 still has its archive job
    remaining = queue.claim(JobKind.STORE, limit=10)
    assert [job.instance.spool_path for job in remaining] == [shared]
    queue.close()


def test_retry_makes_waiting_jobs_due_and_requeues_dead_letters(tmp_path: Path) -> None:
    queue = SqliteJobQueue.open(tmp_path / "queue.sqlite3")
    operations = SqliteQueueOperations(queue.database)
    pacs = JobSpec(JobKind.FORWARD, "pacs")
    record(queue, tmp_path, "1", [pacs])
    record(queue, tmp_path, "2", [pacs])
    first, second = queue.claim(JobKind.FORWARD, target="pacs", limit=10)
    queue.retry_later(first, "cannot connect", delay=3600)
    queue.dead_letter(second, "status 0xA900")
    assert queue.claim(JobKind.FORWARD, target="pacs") == []

    assert operations.retry(JobKind.FORWARD, "pacs") == 1
    assert [j.id for j in queue.claim(JobKind.FORWARD, target="pacs")] == [first.id]
    assert operations.retry(JobKind.FORWARD, "elsewhere", failed=True) == 0
    assert operations.retry(JobKind.FORWARD, "pacs", failed=True) == 1
    again = queue.claim(JobKind.FORWARD, target="pacs")
    assert [(j.id, j.attempts) for j in again] == [(second.id, 1)]  # restarted: this is attempt 1
    report = {(r.target, r.state): r for r in operations.report()}
    assert report[("pacs", "running")].count == 2
    assert time.time() - report[("pacs", "running")].oldest_created_at < 60
    queue.close()


def test_queue_purge_cli_deletes_dead_letters_and_their_unneeded_spool_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[[destination]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
    )
    spool = tmp_path / "data" / "spool"
    spool.mkdir(parents=True)
    queue = SqliteJobQueue.open(tmp_path / "data" / "queue.sqlite3")
    spooled = record(queue, spool, "1", [JobSpec(JobKind.FORWARD, "pacs")])
    (job,) = queue.claim(JobKind.FORWARD, target="pacs")
    queue.dead_letter(job, "status 0xA900 (data set does not match SOP class)")
    queue.close()

    assert cli_main(["queue", "status", "-c", str(config)]) == 0
    assert "status 0xA900" in capsys.readouterr().out
    assert cli_main(["queue", "purge", "-c", str(config), "--destination", "pacs"]) == 1
    assert spooled.exists()  # a dry run
    assert cli_main(["queue", "purge", "-c", str(config), "--destination", "pacs", "--yes"]) == 0
    assert "deleted 1 failed jobs" in capsys.readouterr().out
    assert not spooled.exists()
    assert cli_main(["queue", "status", "-c", str(config)]) == 0
    assert "forward  pacs    idle" in capsys.readouterr().out
