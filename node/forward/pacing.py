"""Workers of one destination making room for each other's associations.

A peer that serves one association at a time (DCMTK storescp without --fork, many
small PACS) leaves a second worker's A-ASSOCIATE-RQ unanswered until the first
worker releases its association, and the first used to keep it open for
idle_timeout seconds after its last C-STORE. Instances claimed by the second
worker then arrived 5-12 s late, with nothing logged. Now a worker says while it
waits for an association, and a worker with nothing to send releases its own at
once when a sibling is waiting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Associating:
    """How many of a destination's workers are waiting for an association right now."""

    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake  # the destination's: idle siblings look again at once
        self._lock = threading.Lock()
        self._count = 0

    @contextmanager
    def waiting(self) -> Iterator[None]:
        with self._lock:
            self._count += 1
        self._wake.set()
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1

    def sibling_waiting(self) -> bool:
        with self._lock:
            return self._count > 0
