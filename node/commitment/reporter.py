"""The reporter: settle requested commitments as their instances arrive, and deliver each report.

One thread. Every second, or when woken (a new request, a job done), it reads
the open requests from the queue database, settles the items whose instances
meet `when` (durably), and sends the N-EVENT-REPORT-RQ of every request whose
items are all settled: over the requesting association if it is still open,
else over a new association to its `[[commitment.requestor]]`, proposing SCP/SCU
Role Selection with us as the SCP (PS3.4 J.3.3, PS3.7 D.3.3.4). A report that
cannot be delivered is tried again with the destinations' backoff, for ever:
it is deleted only once the requestor answered it with Success, so a report
is never lost, and sent once (a kill between the response and that commit can
send it twice; the Transaction UID lets the requestor see it is the same).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from node.commitment import counters
from node.commitment.evaluator import When, outcome
from node.commitment.messages import (
    COMMITMENT_SYNTAXES,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    CommitmentReport,
    Failure,
    Reference,
    describe_reason,
    encode_report,
)
from node.config.model import CommitmentConfig, NodeConfig, RequestorConfig, RetryPolicy
from node.jobs.commitments import COMMITTED, Commitment, Direction
from node.jobs.interface import CommitmentRecords
from node.jobs.retry import RetrySchedule
from node.net import dimse
from node.net.association import RequestFailed
from node.net.dimse import Command
from node.net.storelink import LinkError, Peer, Timeouts, associate

log = logging.getLogger("node.commitment")

POLL_INTERVAL = 1.0
PRUNE_INTERVAL = 600.0
# Finished instances are remembered this long past the report timeout, for late requests.
HISTORY_MARGIN = 86400.0
# The destinations' default backoff ([destination.retry]): 5 s doubling to 10 min.
REPORT_SCHEDULE = RetrySchedule(RetryPolicy())


class ReportChannel(Protocol):
    """The requesting association, while it is open (node.net.association.Association)."""

    @property
    def address(self) -> str: ...
    def context_for(self, abstract_syntax: str) -> tuple[int, str] | None: ...
    def send_request(
        self, context_id: int, command_for: Callable[[int], bytes], dataset: bytes, timeout: float
    ) -> Command: ...


class ReportNotDelivered(Exception):
    """Why a report did not reach its requestor this time."""


def report_of(commitment: Commitment) -> CommitmentReport:
    committed = []
    failed = []
    for item in commitment.items:
        reference = Reference(item.sop_class_uid, item.sop_instance_uid)
        if item.reason == COMMITTED:
            committed.append(reference)
        else:
            failed.append(Failure(reference, int(item.reason or 0x0110)))
    return CommitmentReport(commitment.transaction_uid, tuple(committed), tuple(failed))


class Reporter:
    """Settles requested commitments and delivers their N-EVENT-REPORTs."""

    def __init__(
        self, config: CommitmentConfig, node: NodeConfig, records: CommitmentRecords
    ) -> None:
        self.config = config
        self.node = node
        self.records = records
        self.when: When = config.when
        self.wake = threading.Event()
        self._stopping = threading.Event()
        self._channels: dict[int, ReportChannel] = {}  # commitment id -> its open association
        self._lock = threading.Lock()
        self._pruned = 0.0
        self._thread = threading.Thread(target=self._loop, name="commitment-reporter", daemon=True)

    # From the acceptor's threads.

    def remember(self, commitment_id: int, channel: ReportChannel) -> None:
        with self._lock:
            self._channels[commitment_id] = channel
        self.wake.set()

    def forget(self, channel: object) -> None:
        """The association ended: its reports go over new associations."""
        with self._lock:
            for key in [k for k, v in self._channels.items() if v is channel]:
                del self._channels[key]

    # The thread.

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.step()
            except Exception:
                log.exception("storage commitment reporter: unexpected error")
                self._stopping.wait(5.0)
            self.wake.wait(POLL_INTERVAL)
            self.wake.clear()

    def step(self) -> None:
        """Settle what can be settled, then send what is due."""
        now = time.time()
        if now - self._pruned > PRUNE_INTERVAL:
            self._pruned = now
            self.records.prune_finished(now - self.config.report_timeout - HISTORY_MARGIN)
        for commitment in self.records.open_commitments(Direction.REQUESTED):
            if self._stopping.is_set():
                return
            commitment = self._settle(commitment, now)
            if commitment.settled and commitment.next_attempt_at <= now:
                self._deliver(commitment)

    def _settle(self, commitment: Commitment, now: float) -> Commitment:
        open_items = [i for i, item in enumerate(commitment.items) if item.reason is None]
        if not open_items:
            return commitment
        progress = self.records.instance_progress(
            [commitment.items[i].sop_instance_uid for i in open_items]
        )
        expired = now >= commitment.deadline
        reasons: dict[int, int] = {}
        for position in open_items:
            item = commitment.items[position]
            found = outcome(item, progress.get(item.sop_instance_uid), self.when, expired)
            if found is not None:
                reasons[position] = found
        if not reasons:
            return commitment
        self.records.settle_items(commitment.id, reasons)
        items = tuple(
            dataclasses.replace(item, reason=reasons.get(i, item.reason))
            for i, item in enumerate(commitment.items)
        )
        return dataclasses.replace(commitment, items=items)

    def _deliver(self, commitment: Commitment) -> None:
        report = report_of(commitment)
        with self._lock:
            channel = self._channels.get(commitment.id)
        try:
            how = self._send(commitment, report, channel)
        except ReportNotDelivered as exc:
            delay = REPORT_SCHEDULE.delay(commitment.attempts + 1)
            self.records.defer_commitment(commitment.id, str(exc), time.time() + delay)
            counters.record_report_retry("sent")
            log.warning(
                "storage commitment report for Transaction UID %s to %r not delivered: %s;"
                " attempt %d, retrying in %.1f s",
                commitment.transaction_uid,
                commitment.peer,
                exc,
                commitment.attempts + 1,
                delay,
            )
            return
        self.records.close_commitment(commitment.id)
        with self._lock:
            self._channels.pop(commitment.id, None)
        failed = [f.reason for f in report.failed]
        counters.record_report("sent", failed, time.time() - commitment.created_at)
        log.info(
            "storage commitment report for Transaction UID %s delivered to %r %s: %d committed,"
            " %d failed%s",
            commitment.transaction_uid,
            commitment.peer,
            how,
            len(report.committed),
            len(report.failed),
            _failures(report.failed),
        )

    def _send(
        self, commitment: Commitment, report: CommitmentReport, channel: ReportChannel | None
    ) -> str:
        if channel is not None:
            context = channel.context_for(STORAGE_COMMITMENT_PUSH_MODEL)
            if context is not None:
                try:
                    self._send_on(channel, context, report)
                    return f"on its association from {channel.address}"
                except ReportNotDelivered as exc:
                    log.info(
                        "storage commitment report for Transaction UID %s: %s; trying a new"
                        " association",
                        commitment.transaction_uid,
                        exc,
                    )
        requestor = self._requestor(commitment.peer)
        self._send_new(commitment, report, requestor)
        return f"on a new association to {requestor.host}:{requestor.port}"

    def _send_on(
        self, channel: ReportChannel, context: tuple[int, str], report: CommitmentReport
    ) -> None:
        context_id, syntax = context
        try:
            response = channel.send_request(
                context_id,
                lambda message_id: _event_report_command(message_id, report),
                encode_report(report, syntax),
                self.node.dimse_timeout or 60.0,
            )
        except RequestFailed as exc:
            raise ReportNotDelivered(str(exc)) from None
        _check_status(response.status)

    def _requestor(self, ae_title: str) -> RequestorConfig:
        for requestor in self.config.requestor:
            if requestor.ae_title == ae_title:
                return requestor
        raise ReportNotDelivered(
            f"the requesting association is gone and no [[commitment.requestor]] has"
            f" ae_title = {ae_title!r}"
        )

    def _send_new(
        self, commitment: Commitment, report: CommitmentReport, requestor: RequestorConfig
    ) -> None:
        node = self.node
        timeouts = Timeouts(node.acse_timeout, node.dimse_timeout, node.network_timeout)
        try:
            association = associate(
                Peer(requestor.ae_title, requestor.host, requestor.port),
                commitment.our_ae_title or node.ae_title,
                [(STORAGE_COMMITMENT_PUSH_MODEL, syntax) for syntax in COMMITMENT_SYNTAXES],
                max_pdu=node.max_pdu,
                timeouts=timeouts,
                # We send the N-EVENT-REPORT as the SCP: the requestor is SCU of this class.
                roles=[(STORAGE_COMMITMENT_PUSH_MODEL, False, True)],
            )
        except LinkError as exc:
            raise ReportNotDelivered(str(exc)) from None
        try:
            response = association.normalized(
                STORAGE_COMMITMENT_PUSH_MODEL,
                lambda message_id, _syntax: _event_report_command(message_id, report),
                lambda syntax: encode_report(report, syntax),
                dimse.N_EVENT_REPORT_RSP,
            )
        except LinkError as exc:
            raise ReportNotDelivered(str(exc)) from None
        finally:
            association.release()
        _check_status(response.status)


def _event_report_command(message_id: int, report: CommitmentReport) -> bytes:
    return dimse.encode_event_report_request(
        message_id,
        STORAGE_COMMITMENT_PUSH_MODEL,
        STORAGE_COMMITMENT_INSTANCE,
        report.event_type_id,
    )


def _check_status(status: int | None) -> None:
    if status != 0x0000:
        shown = "none" if status is None else f"0x{status:04X}"
        raise ReportNotDelivered(
            f"the requestor answered the N-EVENT-REPORT-RQ with status {shown}"
        )


def _failures(failed: Sequence[Failure]) -> str:
    if not failed:
        return ""
    shown = ", ".join(
        f"{f.reference.sop_instance_uid}: {describe_reason(f.reason)}" for f in failed[:5]
    )
    more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
    return f" ({shown}{more})"
