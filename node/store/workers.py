"""Store workers: move queued instances from the spool into their storage targets.

A job is claimed from the queue, its file is staged next to its final path
(transcoded in a worker process if the target asks for another syntax), then
renamed into place. Only then is the job marked done; the spool file goes when
every job of its instance is done. A crash anywhere leaves the job pending.
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
from node.dicom.syntaxes import syntax_name
from node.ingest.spool import Spool
from node.jobs.interface import JobQueue
from node.jobs.model import Job, JobKind
from node.jobs.retry import STORAGE_SCHEDULE, RetrySchedule
from node.shape import ShapeContext, ShapingFailed
from node.store.durable import link_or_copy
from node.store.targets import PlacedInstance, StorageTarget
from node.transcode import Outcome

log = logging.getLogger("node.workers")


@dataclass(frozen=True)
class StagedFile:
    """A file written and fsynced in a target's staging folder, ready to rename."""

    path: Path
    transfer_syntax: str
    note: str = ""


# Writes the instance of a job into the staging path, in the target's syntax.
Stager = Callable[[Job, StorageTarget, Path], StagedFile]


def stage_as_received(job: Job, target: StorageTarget, staged: Path) -> StagedFile:
    link_or_copy(job.instance.spool_path, staged)
    return StagedFile(staged, job.instance.transfer_syntax)


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

    def start(self) -> None:
        self._loop_thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming; let running jobs finish. Unfinished ones are requeued at next start."""
        self._stopping.set()
        self.wake.set()
        self._loop_thread.join(timeout)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            free = self._take_free_slots()
            jobs = [] if self._stopping.is_set() else self.queue.claim(JobKind.STORE, limit=free)
            for _ in range(free - len(jobs)):
                self._slots.release()
            if not jobs:
                self._wait_for_work()
                continue
            for job in jobs:
                self._executor.submit(self._run_and_release, job)

    def _take_free_slots(self) -> int:
        """Wait for one free thread, then take every other free one: one claim fills them
        all (a claim is a write transaction, and ingest waits for the same database)."""
        self._slots.acquire()
        free = 1
        while free < self.threads and self._slots.acquire(blocking=False):
            free += 1
        return free

    def _wait_for_work(self) -> None:
        due = self.queue.next_due_in(JobKind.STORE)
        self.wake.wait(timeout=1.0 if due is None else min(1.0, max(due, 0.01)))
        self.wake.clear()

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
            # Bookkeeping too: if the queue cannot record it (e.g. a full disk), the job
            # must be retried, not left 'running' until the next restart.
            self._finish(job, target, placed, staged)
        except ShapingFailed as refusal:
            # The target's view of this instance cannot be made (burned-in annotation for
            # a de-identifying target, say): retrying changes nothing, and storing it as
            # received would store what the target must not have.
            self._dead_letter_unshapable(job, target, str(refusal))
        except Exception as exc:
            self._retry_or_give_up(job, target, str(exc))

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

    def _retry_or_give_up(self, job: Job, target: StorageTarget, error: str) -> None:
        uid = job.instance.sop_instance_uid
        if self.schedule.gives_up(job.attempts):
            reason = f"gave up after {job.attempts} attempts: {error}"
            self.queue.dead_letter(job, reason)
            metrics.record_stored(target.name, "failed")
            log.error("dead letter: SOP Instance UID %s for %r: %s", uid, target.name, reason)
            return
        delay = self.schedule.delay(job.attempts)
        log.error(
            "storing SOP Instance UID %s in %r failed (attempt %d), retrying in %.0f s: %s",
            uid,
            target.name,
            job.attempts,
            delay,
            error,
        )
        self.queue.retry_later(job, error, delay)
        metrics.record_stored(target.name, "retry")

    def _store(self, job: Job, target: StorageTarget) -> tuple[PlacedInstance, StagedFile]:
        staging_path = target.staging_path()
        try:
            staged = self.stage(job, target, staging_path)
            previous = self.queue.stored_path(target.name, job.instance.sop_instance_uid)
            placed = target.commit(staged.path, read_file_header(staged.path), previous)
        finally:
            staging_path.unlink(missing_ok=True)
        return placed, staged

    def _finish(
        self, job: Job, target: StorageTarget, placed: PlacedInstance, staged: StagedFile
    ) -> None:
        instance = job.instance
        spool_file = self.queue.complete_stored(job, placed.path, staged.transfer_syntax)
        stored_size = _file_size(placed.path)
        metrics.record_stored(target.name, "stored", stored_size)
        if spool_file is not None:
            self.spool.remove(spool_file)
        log.info(
            "stored SOP Instance UID %s from %r: %s -> %s, %d -> %d bytes, %s in %r, %s",
            instance.sop_instance_uid,
            instance.calling_ae_title,
            syntax_name(instance.transfer_syntax),
            syntax_name(staged.transfer_syntax),
            instance.size,
            stored_size,
            placed.placement,
            target.name,
            staged.note or "no fallback",
        )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # moved away already (e.g. by an archiver): the metric is not worth failing for
        return 0
