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
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from node.daemon import metrics
from node.ingest.spool import Spool
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
        self._inbox: queue.Queue[Delivery | Callable[[], None]] = queue.Queue(CAPACITY)
        self._thread = threading.Thread(target=self._loop, name="forward-completions", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, delivery: Delivery) -> None:
        self._inbox.put(delivery)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything added so far is committed; False on timeout."""
        done = threading.Event()
        self._inbox.put(done.set)
        return done.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self.flush(timeout)
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            items = [self._inbox.get()]
            while len(items) < BATCH:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            deliveries = [item for item in items if isinstance(item, Delivery)]
            if deliveries:
                self._commit(deliveries)
            for item in items:
                if item is _STOP:
                    return
                if not isinstance(item, Delivery):
                    item()  # a flush marker: everything before it is committed

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


def _stop() -> None:
    """The marker that ends the committing thread."""


_STOP: Callable[[], None] = _stop
