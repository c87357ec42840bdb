"""Store jobs whose files are in place, made durable in batches off the worker threads.

A CT series lands in one folder, slice after slice. Each worker used to fsync that
folder and wait for a queue commit of its own for every slice. Here a worker hands
the placed instance over and takes its next job; one thread takes whatever has
piled up, fsyncs each folder it touches once, then completes all of those jobs in
one durable commit, and only then deletes the spool files, counts and logs. The
rule is unchanged: nothing counts as stored before its folder is fsynced, and a
spool file goes only after the commit that says its instance is stored. A crash
before that commit leaves the jobs running, so they run again after the restart
and find their files already in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node.daemon import metrics
from node.dicom.syntaxes import syntax_name
from node.ingest.spool import Spool
from node.jobs.batches import BatchThread
from node.jobs.interface import JobQueue
from node.jobs.model import Job
from node.store.durable import fsync_directory
from node.store.targets import PlacedInstance

log = logging.getLogger("node.workers")

CAPACITY = 1024  # placed jobs waiting for their commit; a worker blocks beyond this
BATCH = 256  # jobs per commit, at most


@dataclass(frozen=True)
class Placed:
    """A store job whose file is at its layout path, waiting for its folder fsync and commit."""

    job: Job
    placed: PlacedInstance
    transfer_syntax: str  # as stored
    note: str  # a fallback's reasons, for the log


# Reschedules a job whose commit failed: (job, error).
Retry = Callable[[Job, str], None]


class StoredCommits:
    """One committing thread for the store workers."""

    def __init__(self, jobs: JobQueue, spool: Spool, retry: Retry) -> None:
        self.jobs = jobs
        self.spool = spool
        self.retry = retry
        self._batches = BatchThread("store-commits", self._commit, CAPACITY, BATCH)

    def start(self) -> None:
        self._batches.start()

    def add(self, placed: Placed) -> None:
        self._batches.add(placed)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything added so far is committed (or rescheduled); False on timeout."""
        return self._batches.flush(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        self._batches.stop(timeout)

    def _commit(self, batch: list[Placed]) -> None:
        durable = self._sync_folders(batch)
        if not durable:
            return
        try:
            finished = self.jobs.complete_stored_many(
                [(p.job, p.placed.path, p.transfer_syntax) for p in durable]
            )
        except Exception as exc:  # sqlite3.Error or OSError (a full disk): nothing was recorded
            for p in durable:
                self.retry(p.job, f"cannot record it in the queue: {exc}")
            return
        for path in finished:
            self.spool.remove(path)
        for p in durable:
            _count_and_log(p)

    def _sync_folders(self, batch: list[Placed]) -> list[Placed]:
        """fsync every folder the batch placed files in, once; the placed jobs whose folder
        is durable now (the others are rescheduled with the reason)."""
        failed: dict[Path, str] = {}
        for folder in dict.fromkeys(p.placed.unsynced_folder for p in batch):
            if folder is None:
                continue
            try:
                fsync_directory(folder)
            except OSError as exc:
                failed[folder] = f"cannot fsync {folder}: {exc}"
        for p in batch:
            if p.placed.unsynced_folder in failed:
                self.retry(p.job, failed[p.placed.unsynced_folder])
        return [p for p in batch if p.placed.unsynced_folder not in failed]


def _count_and_log(p: Placed) -> None:
    instance = p.job.instance
    size = _file_size(p)
    metrics.record_stored(p.job.target, "stored", size)
    log.info(
        "stored SOP Instance UID %s from %r: %s -> %s, %d -> %d bytes, %s in %r, %s",
        instance.sop_instance_uid,
        instance.calling_ae_title,
        syntax_name(instance.transfer_syntax),
        syntax_name(p.transfer_syntax),
        instance.size,
        size,
        p.placed.placement,
        p.job.target,
        p.note or "no fallback",
    )


def _file_size(p: Placed) -> int:
    if p.placed.size is not None:  # not a local file (an S3 object): the target said
        return p.placed.size
    try:
        return p.placed.path.stat().st_size
    except OSError:  # moved away already (e.g. by an archiver): the metric is not worth failing for
        return 0
