"""The one retry schedule of store and forward jobs: exponential backoff with jitter.

A forward job follows its destination's `[destination.retry]` table. A store
job follows STORAGE_RETRY: it is retried until it succeeds and never becomes a
dead letter, because local storage is the copy a PACS administrator expects to
exist; the usual causes (a full disk, a storage folder gone or read-only, an
unmounted share) pass once fixed, and then the node catches up on its own.
`dicom-node queue status` shows when each target gives up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol


class RetryLimits(Protocol):
    """What a schedule reads from its policy (config's RetryPolicy has these fields)."""

    @property
    def initial_delay(self) -> float: ...

    @property
    def max_delay(self) -> float: ...

    @property
    def max_attempts(self) -> int: ...


@dataclass(frozen=True)
class Backoff:
    """Limits not read from a config file (STORAGE_RETRY)."""

    initial_delay: float
    max_delay: float
    max_attempts: int = 0  # 0 = retry forever


# 1 s, 2 s, 4 s ... 5 min between tries, for ever (the delays store jobs always had).
STORAGE_RETRY = Backoff(initial_delay=1.0, max_delay=300.0, max_attempts=0)


@dataclass(frozen=True)
class RetrySchedule:
    """When to try a job again after `attempts` failed tries, and when to give up."""

    policy: RetryLimits

    def delay(self, attempts: int) -> float:
        base = self.policy.initial_delay * 2.0 ** max(0, attempts - 1)
        # Jitter spreads retries so many jobs (or nodes) do not hit the peer in step.
        return min(self.policy.max_delay, base) * random.uniform(0.8, 1.0)

    def gives_up(self, attempts: int) -> bool:
        return 0 < self.policy.max_attempts <= attempts

    def describe_limit(self) -> str:
        """When jobs become dead letters, as `queue status` shows it."""
        attempts = self.policy.max_attempts
        return "never" if attempts <= 0 else f"after {attempts}"


# The schedule every store job follows (see the module docstring for why it never gives up).
STORAGE_SCHEDULE = RetrySchedule(STORAGE_RETRY)
