"""Store workers claim as many jobs as they have free threads, in one transaction."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from node.jobs.model import JobKind
from node.store.workers import StoreWorkers


class FakeQueue:
    """Hands out numbered jobs and remembers the limit of every claim."""

    def __init__(self, jobs: int) -> None:
        self.pending = list(range(jobs))
        self.limits: list[int] = []
        self.lock = threading.Lock()

    def claim(self, kind: JobKind, *, limit: int = 16) -> list[int]:
        with self.lock:
            self.limits.append(limit)
            taken, self.pending = self.pending[:limit], self.pending[limit:]
            return taken

    def next_due_in(self, kind: JobKind) -> float | None:
        return 0.0 if self.pending else None


class RecordingWorkers(StoreWorkers):
    def __init__(self, queue: FakeQueue) -> None:
        super().__init__(queue, None, {}, threads=4)  # type: ignore[arg-type]
        self.ran: list[int] = []

    def run(self, job: int) -> None:  # type: ignore[override]
        time.sleep(0.05)
        with self.queue.lock:  # type: ignore[attr-defined]
            self.ran.append(job)


def test_one_claim_fills_every_free_thread_and_no_job_is_lost(tmp_path: Path) -> None:
    queue = FakeQueue(jobs=10)
    workers = RecordingWorkers(queue)
    workers.start()
    deadline = time.monotonic() + 10
    while len(workers.ran) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    workers.stop()
    assert sorted(workers.ran) == list(range(10))
    assert queue.limits[0] == 4  # all four threads were free: one claim for four jobs
    assert max(queue.limits) <= 4
