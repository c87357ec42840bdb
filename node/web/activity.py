"""What the node did lately, kept in memory for the status page: the associations that
ended (or were refused) and how long each destination took to deliver.

Both are bounded (the newest MAX_ASSOCIATIONS associations, the newest MAX_DELAYS
deliveries per destination) and are fed from node.daemon.metrics. No patient
data is kept: AE titles, addresses, counts and negotiated syntaxes only.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass

MAX_ASSOCIATIONS = 50
MAX_DELAYS = 500
DELAY_WINDOW = 3600.0  # seconds of deliveries the delay summary covers


@dataclass(frozen=True)
class AssociationRecord:
    """One association from a peer, as it ended: released, aborted or rejected."""

    ended_at: float
    outcome: str  # "released", "aborted" or "rejected"
    address: str
    calling_ae_title: str
    called_ae_title: str
    contexts: str = ""  # "3/5 contexts accepted (ExplicitVRLittleEndian, ...)"
    instances: int = 0  # stored (answered success)
    bytes: int = 0
    refused: int = 0  # C-STOREs answered with a failure status
    duration: float = 0.0
    reason: str = ""  # why it was rejected


class RecentAssociations:
    def __init__(self, size: int = MAX_ASSOCIATIONS) -> None:
        self._records: deque[AssociationRecord] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, record: AssociationRecord) -> None:
        with self._lock:
            self._records.append(record)

    def newest_first(self) -> list[AssociationRecord]:
        with self._lock:
            return list(reversed(self._records))


@dataclass(frozen=True)
class DelaySummary:
    """Acknowledgement (the C-STORE success to the sender) to delivery at a destination."""

    deliveries: int  # in the last DELAY_WINDOW seconds (at most MAX_DELAYS)
    last: float | None
    median: float | None
    maximum: float | None


class DeliveryDelays:
    """The newest delivery delays per destination."""

    def __init__(self, size: int = MAX_DELAYS) -> None:
        self._size = size
        self._delays: dict[str, deque[tuple[float, float]]] = {}
        self._lock = threading.Lock()

    def add(self, destination: str, seconds: float, now: float | None = None) -> None:
        at = time.time() if now is None else now
        with self._lock:
            delays = self._delays.setdefault(destination, deque(maxlen=self._size))
            delays.append((at, max(0.0, seconds)))

    def summary(self, destination: str, now: float | None = None) -> DelaySummary:
        since = (time.time() if now is None else now) - DELAY_WINDOW
        with self._lock:
            recent = [s for at, s in self._delays.get(destination, ()) if at >= since]
        if not recent:
            return DelaySummary(0, None, None, None)
        return DelaySummary(len(recent), recent[-1], statistics.median(recent), max(recent))
