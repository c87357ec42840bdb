"""Store workers: move queued instances from the spool into their storage targets.

A job is claimed from the queue, its file is staged next to its final path
(transcoded in a worker process if the target asks for another syntax), then
renamed into place. Stored as received, the fsynced spool file itself is
hard-linked into place (copied only onto another filesystem), and the path comes
from the header values intake recorded: no bytes copied, no second parse. Only
then is the job marked done; the spool file goes when every job of its instance
is done. The folder fsync and the queue commit that make a placed file count as
stored are batched by one thread (node.store.commits). A crash anywhere leaves the
job pending.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from node.daemon import metrics
from node.ingest.spool import Spool
from node.jobs.interface import JobQueue
from node.jobs.model import Job, JobKind
from node.jobs.retry import STORAGE_SCHEDULE, RetrySchedule
from node.shape import ShapeContext, ShapingFailed
from node.store.commits import Placed, StoredCommits
from node.store.targets import PlacedInstance, StorageTarget
from node.transcode import Outcome

log = logging.getLogger("node.workers")


@dataclass(frozen=True)
class StagedFile:
    """A file written and fsynced in a target's staging folder, ready to rename.

    as_received: `path` is the spool file itself, unchanged: it is linked into place,
    never moved, and its header is the one intake read.
    """

    path: Path
    transfer_syntax: str
    note: str = ""
    as_received: bool = False


# Writes the instance of a job into the staging path, in the target's syntax.
Stager = Callable[[Job, StorageTarget, Path], StagedFile]


def stage_as_received(job: Job, target: StorageTarget, staged: Path) -> StagedFile:
    """Nothing to write: the spool file is already complete and fsynced."""
    return StagedFile(job.instance.spool_path, job.instance.transfer_syntax, as_received=True)


# (source, destination, ladder, allow_lossy=) -> Outcome; TranscodePool.transcode fits.
Transcoder = Callable[..., Outcome]


def transcoding_stager(transcode: Transcoder) -> Stager:
    """Stage in the target's configured ladder, with its header changes made in the same
    step; a target that needs neither stores as received."""

    def stage(job: Job, target: StorageTarget, staged: Path) -> StagedFile:
        if target.stores_as_received:
            return stage_as_received(job, target, staged)
        ladder = target.config.transfer_syntax
        started = time.monotonic()
        outcome = transcode(
            job.instance.spool_path,
            staged,
            ladder,
            allow_lossy=target.config.allow_lossy,
            shaping=target.shaping,
            context=shape_context(job),
        )
        if ladder:
            metrics.record_transcode(
                ladder[0].name, time.monotonic() - started, outcome.fallback, outcome.reasons
            )
        note = f"fell back: {'; '.join(outcome.reasons)}" if outcome.fallback else ""
        if target.shaping is not None:
            renamed = outcome.sop_instance_uid != job.instance.sop_instance_uid
            view = target.shaping.describe()
            if renamed and outcome.sop_instance_uid:
                view += f", stored as SOP Instance UID {outcome.sop_instance_uid}"
            note = "; ".join(n for n in (view, note) if n)
        return StagedFile(staged, outcome.transfer_syntax, note)

    return stage


def shape_context(job: Job) -> ShapeContext:
    return ShapeContext(job.instance.calling_ae_title, job.instance.called_ae_title)


def read_file_header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True, defer_size=4096)


class StoreWorkers:
    """Threads that claim store jobs; codec work goes to processes inside the stager."""

    def __init__(
        self,
        queue: JobQueue,
        spool: Spool,
        targets: Mapping[str, StorageTarget],
        stage: Stager = stage_as_received,
        threads: int = 4,
        schedule: RetrySchedule = STORAGE_SCHEDULE,
    ) -> None:
        self.queue = queue
        self.schedule = schedule
        self.spool = spool
        self.targets = dict(targets)
        self.stage = stage
        self.threads = threads
        self.wake = threading.Event()
        self._stopping = threading.Event()
        self._slots = threading.Semaphore(threads)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="store")
        self._loop_thread = threading.Thread(target=self._loop, name="store-dispatch", daemon=True)
        self.commits = StoredCommits(queue, spool, self._retry_or_give_up)

    def start(self) -> None:
        self.commits.start()
        self._loop_thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming; let running jobs finish. Unfinished ones are requeued at next start."""
        self._stopping.set()
        self.wake.set()
        self._loop_thread.join(timeout)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.commits.stop(timeout)  # files already in place are committed before the queue closes

    def _loop(self) -> None:
        while not self._stopping.is_set():
            free = self._take_free_slots()
            # Cleared before the claim: an instance recorded from now on wakes the wait below,
            # and one recorded before is in this claim. A short claim means nothing else is
            # due, so the loop waits instead of claiming (a write transaction) for nothing.
            self.wake.clear()
            jobs = [] if self._stopping.is_set() else self.queue.claim(JobKind.STORE, limit=free)
            for _ in range(free - len(jobs)):
                self._slots.release()
            for job in jobs:
                if self._is_as_received(job):
                    # A link and a few stat()s: done here, not worth a thread hand-over.
                    self._run_and_release(job)
                else:
                    self._executor.submit(self._run_and_release, job)
            if len(jobs) < free:
                self._wait_for_work()

    def _is_as_received(self, job: Job) -> bool:
        """Its target stores as received (no transfer syntax ladder, no header changes) on a
        local disk: an object store's PUT is a round trip, for a worker thread."""
        plain = [
            name
            for name, target in self.targets.items()
            if target.stores_as_received and target.places_locally
        ]
        return bool(plain) and job.target in plain

    def _take_free_slots(self) -> int:
        """Wait for one free thread, then take every other free one: one claim fills them
        all (a claim is a write transaction, and ingest waits for the same database)."""
        self._slots.acquire()
        free = 1
        while free < self.threads and self._slots.acquire(blocking=False):
            free += 1
        return free

    def _wait_for_work(self) -> None:
        if self.wake.is_set() or self._stopping.is_set():
            return  # recorded since the claim: no need to ask when the next job is due
        due = self.queue.next_due_in(JobKind.STORE)
        self.wake.wait(timeout=1.0 if due is None else min(1.0, max(due, 0.01)))

    def _run_and_release(self, job: Job) -> None:
        try:
            self.run(job)
        finally:
            self._slots.release()

    def run(self, job: Job) -> None:
        """Store one job's instance; on failure retry it on the schedule (STORAGE_RETRY: for ever)."""
        target = self.targets.get(job.target)
        if target is None:
            self.queue.dead_letter(
                job, f"no [[storage]] named {job.target!r} in the current config"
            )
            metrics.record_stored(job.target, "failed")
            return
        try:
            placed, staged = self._store(job, target)
        except ShapingFailed as refusal:
            # The target's view of this instance cannot be made (burned-in annotation for
            # a de-identifying target, say): retrying changes nothing, and storing it as
            # received would store what the target must not have.
            self._dead_letter_unshapable(job, target, str(refusal))
            return
        except Exception as exc:
            self._retry_or_give_up(job, str(exc))
            return
        # Its folder fsync and the commit follow in a batch; a failure there retries it too.
        self.commits.add(Placed(job, placed, staged.transfer_syntax, staged.note))

    def _dead_letter_unshapable(self, job: Job, target: StorageTarget, reason: str) -> None:
        self.queue.dead_letter(job, reason)
        metrics.record_stored(target.name, "failed")
        log.error(
            "dead letter: SOP Instance UID %s from %r for %r: %s",
            job.instance.sop_instance_uid,
            job.instance.calling_ae_title,
            target.name,
            reason,
        )

    def _retry_or_give_up(self, job: Job, error: str) -> None:
        uid, name = job.instance.sop_instance_uid, job.target
        if self.schedule.gives_up(job.attempts):
            reason = f"gave up after {job.attempts} attempts: {error}"
            self.queue.dead_letter(job, reason)
            metrics.record_stored(name, "failed")
            log.error("dead letter: SOP Instance UID %s for %r: %s", uid, name, reason)
            return
        delay = self.schedule.delay(job.attempts)
        log.error(
            "storing SOP Instance UID %s in %r failed (attempt %d), retrying in %.0f s: %s",
            uid,
            name,
            job.attempts,
            delay,
            error,
        )
        self.queue.retry_later(job, error, delay)
        metrics.record_stored(name, "retry")

    def _store(self, job: Job, target: StorageTarget) -> tuple[PlacedInstance, StagedFile]:
        staging_path = target.staging_path()
        try:
            staged = self.stage(job, target, staging_path)
            previous = self.queue.stored_path(target.name, job.instance.sop_instance_uid)
            final = _destination(job, target, staged)
            placed = target.place(
                staged.path, final, previous, keep_source=staged.as_received, sync=False
            )
        finally:
            staging_path.unlink(missing_ok=True)
        return placed, staged


def _destination(job: Job, target: StorageTarget, staged: StagedFile) -> Path:
    """The layout path: from what intake recorded when the file is the one it read, else
    from the staged file's own header (a transcode may give it a new SOP Instance UID)."""
    if staged.as_received:
        final = target.destination_from(dict(job.instance.header_values))
        if final is not None:
            return final
    return target.destination_for(read_file_header(staged.path))
