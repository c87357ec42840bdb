"""The group timer: dispatch series and study groups when they are stable, settle delivered ones.

One thread reads the waiting groups from the queue (node.jobs.groups) and
dispatches each group whose time has come (node.jobs.model.group_due: stable,
complete or forced), then wakes the workers so that its jobs go at once. The
times are the ones the queue recorded at intake, so after a restart, a kill -9
included, every group's timer goes on from its last arrival, not from the
restart. A stable group is dispatched only if no member arrived since it was
read (if_members), so an instance that comes in at the last moment restarts
the quiet period instead of being raced.

It also marks dispatched groups delivered once every member's job is done,
and records their timings in the metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from node.daemon import metrics
from node.jobs.interface import JobQueue
from node.jobs.model import GroupReport, group_due

log = logging.getLogger("node.groups")

# The longest the timer sleeps: a group made due by `queue release` (another process)
# or a settled group is noticed within this.
MAX_SLEEP = 0.5
MIN_SLEEP = 0.02
ERROR_PAUSE = 5.0


class GroupTimer:
    def __init__(self, queue: JobQueue, wake_workers: Callable[[], None]) -> None:
        self.queue = queue
        self.wake_workers = wake_workers
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="group-timer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                pause = self.tick()
            except Exception:
                # The database busy past its timeout, a bug: groups are durable, the next
                # tick finds them as they were.
                log.exception("group timer: unexpected error")
                pause = ERROR_PAUSE
            self._stopping.wait(pause)

    def tick(self, now: float | None = None) -> float:
        """Dispatch the groups that are due and settle delivered ones; seconds to sleep."""
        now = time.time() if now is None else now
        next_at = now + MAX_SLEEP
        dispatched = False
        for group in self.queue.waiting_groups():
            at, reason = group_due(group)
            if at is None:
                continue
            if at > now:
                next_at = min(next_at, at)
            elif self._dispatch(group, reason):
                dispatched = True
        if dispatched:
            self.wake_workers()
        for group in self.queue.settle_groups():
            _record_delivered(group, now)
        return min(MAX_SLEEP, max(MIN_SLEEP, next_at - time.time()))

    def _dispatch(self, group: GroupReport, reason: str) -> bool:
        # A forced group goes even if members keep arriving; a stable one only as it was seen.
        members = None if reason.startswith("forced") else group.members
        if not self.queue.dispatch_group(group.id, reason, if_members=members):
            return False  # a member arrived since: it is no longer stable
        log.info(
            "%s %s of Study Instance UID %s for %s %r (%s, version %d): %d instances due"
            " together, %s",
            group.level,
            group.series_instance_uid or "(whole study)",
            group.study_instance_uid,
            group.kind,
            group.target,
            group.route,
            group.version,
            group.members,
            reason,
        )
        return True


def _record_delivered(group: GroupReport, now: float) -> None:
    dispatched_at = group.dispatched_at or now
    metrics.record_group_delivered(
        group.kind,
        group.target,
        waited=dispatched_at - group.first_arrival_at,
        took=now - group.first_arrival_at,
    )
    log.info(
        "%s %s of Study Instance UID %s delivered to %s %r: %d instances (version %d,"
        " %s; %.1f s from first arrival to dispatch)",
        group.level,
        group.series_instance_uid or "(whole study)",
        group.study_instance_uid,
        group.kind,
        group.target,
        group.members,
        group.version,
        group.reason,
        dispatched_at - group.first_arrival_at,
    )
