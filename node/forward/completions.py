"""Delivered forward jobs, recorded durably off the sending threads.

A forward worker that waited for the fsync of every "done" before sending the
next instance spent a quarter of its time there (profiled on CT to storescp).
Here it hands the job over and goes on; one thread commits whatever has piled
up in one durable transaction, then deletes finished spool files, counts and
logs. The promise is unchanged: a job is marked done only after the peer
answered success, and a spool file is deleted only after that commit. A crash
before the commit leaves the job running, so it is sent again after the
restart (at-least-once, as before).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from node.daemon import metrics
from node.ingest.spool import Spool
from node.jobs.batches import BatchThread
from node.jobs.interface import JobQueue
from node.jobs.model import Job

log = logging.getLogger("node.forward")

# Deliveries waiting for their commit; a worker blocks beyond this (a disk that stalls).
CAPACITY = 512
BATCH = 256  # completions per transaction, at most


@dataclass(frozen=True)
class Delivery:
    job: Job
    detail: str  # stored as the job's result and logged
    warning: bool  # the peer answered with a warning status
    size: int  # bytes sent


class Completions:
    """One committing thread for all destinations of a forwarder."""

    def __init__(self, jobs: JobQueue, spool: Spool) -> None:
        self.jobs = jobs
        self.spool = spool
        self._batches = BatchThread("forward-completions", self._commit, CAPACITY, BATCH)

    def start(self) -> None:
        self._batches.start()

    def add(self, delivery: Delivery) -> None:
        self._batches.add(delivery)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything added so far is committed; False on timeout."""
        return self._batches.flush(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        self._batches.stop(timeout)

    def _commit(self, deliveries: list[Delivery]) -> None:
        try:
            finished = self.jobs.complete_many([(d.job, d.detail) for d in deliveries])
        except Exception:
            # The database busy past its timeout, a full disk: the jobs stay running and
            # are sent again after the next start (at least once); nothing is deleted.
            log.exception("cannot record %d delivered forward jobs", len(deliveries))
            return
        for path in finished:
            self.spool.remove(path)
        for d in deliveries:
            name = d.job.target
            metrics.record_forwarded(name, "warning" if d.warning else "success", d.size)
            metrics.record_delivery_delay(name, d.job.instance.received_at)
            log.info(
                "forwarded SOP Instance UID %s to %r: %s",
                d.job.instance.sop_instance_uid,
                name,
                d.detail,
            )
