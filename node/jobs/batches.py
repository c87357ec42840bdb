"""One thread that takes whatever work has piled up and handles it as one batch.

Forward deliveries (node.forward.completions) and placed store jobs
(node.store.commits) are recorded this way: the thread that produced an item
goes on, and the durable commit of a batch costs one fsync however many items
it holds. flush() waits until everything added before it has been handled.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class _Marker:
    """A flush (sets its event once everything before it is handled) or the stop."""

    def __init__(self) -> None:
        self.done = threading.Event()


class BatchThread(Generic[Item]):
    def __init__(
        self, name: str, handle: Callable[[list[Item]], None], capacity: int, batch: int
    ) -> None:
        self.handle = handle  # gets each batch, in order; must not raise
        self.batch = batch
        # Items waiting for their batch; add() blocks beyond this (a disk that stalls).
        self._inbox: queue.Queue[Item | _Marker] = queue.Queue(capacity)
        self._stop = _Marker()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, item: Item) -> None:
        self._inbox.put(item)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything added so far is handled; False on timeout."""
        marker = _Marker()
        self._inbox.put(marker)
        return marker.done.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self.flush(timeout)
            self._inbox.put(self._stop)
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            taken = [self._inbox.get()]
            while len(taken) < self.batch:
                try:
                    taken.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            items = [item for item in taken if not isinstance(item, _Marker)]
            if items:
                self.handle(items)
            for item in taken:
                if item is self._stop:
                    return
                if isinstance(item, _Marker):
                    item.done.set()  # everything before it is handled
