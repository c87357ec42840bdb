"""Server lifecycle: build the stages from a Config, start them in order, stop them in reverse."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from node.config import Config
from node.intake import Intake, free_space_probe
from node.queue import JobKind, JobSpec, Queue
from node.route import Router
from node.scp import StorageSCP
from node.spool import Spool
from node.store import StorageTarget
from node.workers import StoreWorkers

log = logging.getLogger("node.server")


def duplicate_checker(
    queue: Queue, targets: dict[str, StorageTarget]
) -> Callable[[str, Sequence[JobSpec]], str | None]:
    """Find a 'reject' storage target that already has, or is getting, this SOP Instance UID."""

    def find_duplicate(sop_instance_uid: str, jobs: Sequence[JobSpec]) -> str | None:
        for job in jobs:
            target = targets.get(job.target) if job.kind == JobKind.STORE else None
            if (
                target
                and target.duplicates == "reject"
                and queue.is_known(target.name, sop_instance_uid)
            ):
                return target.name
        return None

    return find_duplicate


class Node:
    """The running node: queue, spool, storage workers and the SCP."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.queue = Queue(config.queue_path)
        self.spool = Spool(config.spool_dir)
        self.targets = {s.name: StorageTarget(s) for s in config.storage}
        self.router = Router(config)
        self.store_workers = StoreWorkers(self.queue, self.spool, self.targets)
        self.intake = Intake(
            spool=self.spool,
            queue=self.queue,
            plan_jobs=self.router.plan,
            find_duplicate=duplicate_checker(self.queue, self.targets),
            has_headroom=free_space_probe(self._watched_folders(), config.limits.min_free_space),
            max_instance_size=config.limits.max_instance_size,
            on_recorded=self.store_workers.wake.set,
        )
        self.scp = StorageSCP(config, self.intake)
        self._stopped = threading.Event()

    def _watched_folders(self) -> list[Path]:
        return [self.config.spool_dir, *(t.root for t in self.targets.values())]

    def start(self) -> None:
        self.spool.prepare()
        for target in self.targets.values():
            target.prepare()
        requeued = self.queue.requeue_running()
        if requeued:
            log.info("requeued %d jobs that were in flight when the node last stopped", requeued)
        self.store_workers.start()
        self.scp.start()

    def stop(self) -> None:
        log.info("stopping: no new associations; finishing work in progress")
        self.scp.stop()
        self.store_workers.stop()
        self.queue.close()
        self._stopped.set()

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT."""
        stop_requested = threading.Event()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        self.start()
        while not stop_requested.wait(1.0):
            pass
        self.stop()
