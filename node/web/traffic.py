"""Per-minute traffic counters for the last hour, kept in memory for the status page.

Prometheus keeps history for sites that run it; this ring is for the operator
who only has a browser. It holds one bucket per minute: instances and bytes
received, stored, forwarded and refused. A bucket older than the window is
dropped when a newer minute starts, so memory stays at WINDOW buckets whatever
the traffic. The counters are fed from node.daemon.metrics, where every stage
already reports what it did, and are lost at restart (the queue's own state
is what survives a restart, and the page reads it from the database).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from enum import StrEnum

WINDOW = 60  # minutes shown
MINUTE = 60.0


class Flow(StrEnum):
    """What happened to the instances counted in a bucket."""

    RECEIVED = "received"  # C-STORE answered with success: durable in the spool and queue
    STORED = "stored"  # written to a storage target
    FORWARDED = "forwarded"  # delivered to a destination (success or warning status)
    REFUSED = "refused"  # C-STORE answered with a failure status


@dataclass(frozen=True)
class Minute:
    """One bucket: the minute it starts (epoch seconds) and its counts per flow."""

    start: float
    instances: dict[str, int]
    bytes: dict[str, int]


class TrafficRing:
    """Counts per minute over the last WINDOW minutes; safe to call from any thread."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self._lock = threading.Lock()
        # minute number (epoch // 60) -> [instances per flow, bytes per flow]
        self._buckets: dict[int, tuple[dict[Flow, int], dict[Flow, int]]] = {}

    def add(self, flow: Flow, size: int = 0, count: int = 1, now: float | None = None) -> None:
        minute = int((time.time() if now is None else now) // MINUTE)
        with self._lock:
            bucket = self._buckets.get(minute)
            if bucket is None:
                bucket = self._buckets[minute] = ({}, {})
                self._forget_before(minute - self.window + 1)
            instances, sizes = bucket
            instances[flow] = instances.get(flow, 0) + count
            sizes[flow] = sizes.get(flow, 0) + size

    def _forget_before(self, minute: int) -> None:
        for old in [m for m in self._buckets if m < minute]:
            del self._buckets[old]

    def minutes(self, now: float | None = None) -> list[Minute]:
        """Every minute of the window, oldest first, the current (partial) minute last."""
        current = int((time.time() if now is None else now) // MINUTE)
        with self._lock:
            copies = {m: (dict(i), dict(b)) for m, (i, b) in self._buckets.items()}
        result = []
        for minute in range(current - self.window + 1, current + 1):
            instances, sizes = copies.get(minute, ({}, {}))
            result.append(
                Minute(
                    start=minute * MINUTE,
                    instances={f.value: instances.get(f, 0) for f in Flow},
                    bytes={f.value: sizes.get(f, 0) for f in Flow},
                )
            )
        return result

    def totals(self, now: float | None = None) -> dict[str, dict[str, int]]:
        """Instances and bytes per flow over the whole window."""
        minutes = self.minutes(now)
        return {
            "instances": {f.value: sum(m.instances[f.value] for m in minutes) for f in Flow},
            "bytes": {f.value: sum(m.bytes[f.value] for m in minutes) for f in Flow},
        }
