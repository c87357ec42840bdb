"""Storage Commitment towards destinations with `commitment = true`: delivered means committed.

After a worker's batch of C-STOREs succeeded, the worker hands its jobs here:
a sent commitment naming them is recorded durably (the jobs become pending,
due only after the report timeout), then the N-ACTION-RQ goes on the same
association. The destination's N-EVENT-REPORT-RQ, on a new association to our
listener or on ours while we wait, settles them: committed jobs are completed
(and their spool files go once no other job needs them), failed ones are sent
again under the destination's retry rules. With no report by the deadline the
jobs are sent again, and become dead letters once the retry rules give up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence

from node.commitment import counters
from node.commitment.messages import (
    COMMITMENT_SYNTAXES,
    PROCESSING_FAILURE,
    REQUEST_STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    CommitmentMessageError,
    CommitmentRequest,
    Reference,
    decode_report,
    describe_reason,
    encode_request,
    new_transaction_uid,
)
from node.config.model import DestinationConfig
from node.daemon import metrics
from node.forward.completions import Completions, Delivery
from node.jobs.commitments import Commitment, CommitmentItem, Direction, NewCommitment
from node.jobs.interface import CommitmentRecords, JobQueue
from node.jobs.model import Job
from node.jobs.retry import RetrySchedule
from node.net import dimse
from node.net.dimse import Answer, Command
from node.net.storelink import EventReportHandler, LinkError, StoreAssociation

log = logging.getLogger("node.forward")

# Proposed on every association to a destination with commitment = true (default roles:
# we are the SCU, it may report on the same association).
STORAGE_COMMITMENT_CONTEXTS = [
    (STORAGE_COMMITMENT_PUSH_MODEL, syntax) for syntax in COMMITMENT_SYNTAXES
]
WATCH_INTERVAL = 1.0
# The jobs of a sent commitment fall due this long after its deadline, so that the watcher,
# not a worker's claim, decides what a missing report means.
DUE_AFTER_DEADLINE = 30.0


class CommitmentRequester:
    """The Storage Commitment SCU of every destination with `commitment = true`."""

    def __init__(
        self,
        destinations: Sequence[DestinationConfig],
        queue: JobQueue,
        records: CommitmentRecords,
        completions: Completions,
        report_timeout: float,
        ae_title: str,
    ) -> None:
        self.destinations: Mapping[str, DestinationConfig] = {
            d.name: d for d in destinations if d.commitment
        }
        self.queue = queue
        self.records = records
        self.completions = completions
        self.report_timeout = report_timeout
        self.ae_title = ae_title
        self._lock = threading.Lock()  # reports and timeouts settle one commitment at a time
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="commitment-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    # From a destination's worker, after its batch.

    def request(
        self,
        destination: DestinationConfig,
        association: StoreAssociation | None,
        jobs: Sequence[Job],
    ) -> None:
        """Record a sent commitment for these delivered jobs, then send the N-ACTION-RQ."""
        transaction_uid = new_transaction_uid()
        deadline = time.time() + self.report_timeout
        items = tuple(
            CommitmentItem(j.instance.sop_class_uid, j.instance.sop_instance_uid, job_id=j.id)
            for j in jobs
        )
        new = NewCommitment(
            Direction.SENT,
            transaction_uid,
            destination.name,
            self.ae_title,
            deadline + DUE_AFTER_DEADLINE,
            items,
        )
        try:
            commitment_id = self.records.record_commitment(new, waiting=jobs)
        except Exception as exc:  # the database busy past its timeout, a full disk
            log.exception("cannot record a storage commitment request to %r", destination.name)
            error = f"cannot record the storage commitment request: {exc}"
            for job in jobs:
                self._send_again(job, destination, error)
            return
        request = CommitmentRequest(
            transaction_uid,
            tuple(Reference(i.sop_class_uid, i.sop_instance_uid) for i in items),
        )
        try:
            if association is None or not association.established:
                raise LinkError("the association ended after the C-STOREs")
            response = association.normalized(
                STORAGE_COMMITMENT_PUSH_MODEL,
                lambda message_id, _syntax: dimse.encode_action_request(
                    message_id,
                    STORAGE_COMMITMENT_PUSH_MODEL,
                    STORAGE_COMMITMENT_INSTANCE,
                    REQUEST_STORAGE_COMMITMENT,
                ),
                lambda syntax: encode_request(request, syntax),
                dimse.N_ACTION_RSP,
            )
            if response.status != 0x0000:
                raise LinkError(f"it answered the N-ACTION-RQ with status 0x{response.status:04X}")
        except (LinkError, ValueError) as exc:
            self.records.close_commitment(commitment_id)
            error = f"storage commitment request to {destination.name!r} failed: {exc}"
            for job in jobs:
                self._send_again(job, destination, error)
            return
        counters.record_request("sent")
        log.info(
            "requested storage commitment of %d instances from %r, Transaction UID %s",
            len(jobs),
            destination.name,
            transaction_uid,
        )

    # From the acceptor (a report on a new association) or a worker (one on ours).

    def on_report(
        self, calling_ae_title: str, command: Command, syntax: str, data: bytes
    ) -> Answer:
        try:
            report = decode_report(data, syntax)
        except CommitmentMessageError as exc:
            log.warning("storage commitment report from %r refused: %s", calling_ae_title, exc)
            return Answer(PROCESSING_FAILURE, str(exc))
        with self._lock:
            commitment = next(
                (
                    c
                    for c in self.records.open_commitments(Direction.SENT)
                    if c.transaction_uid == report.transaction_uid
                ),
                None,
            )
            if commitment is None:
                # Superseded (its jobs were sent again) or already settled: nothing to do,
                # and a failure status would only make the destination retry.
                log.warning(
                    "storage commitment report from %r for unknown Transaction UID %s: ignored",
                    calling_ae_title,
                    report.transaction_uid,
                )
                return Answer(0x0000)
            failed = {f.reference.sop_instance_uid: f.reason for f in report.failed}
            committed = {r.sop_instance_uid for r in report.committed}
            self._settle(commitment, committed, failed)
        counters.record_report(
            "received", list(failed.values()), time.time() - commitment.created_at
        )
        log.info(
            "storage commitment report from %r for Transaction UID %s: %d committed, %d failed",
            calling_ae_title,
            report.transaction_uid,
            len(committed),
            len(failed),
        )
        return Answer(0x0000)

    def _settle(
        self, commitment: Commitment, committed: set[str], failed: Mapping[str, int]
    ) -> None:
        destination = self.destinations.get(commitment.peer)
        jobs = self._jobs(commitment)
        for job in jobs:
            uid = job.instance.sop_instance_uid
            if uid in committed and uid not in failed:
                detail = f"committed by {commitment.peer!r} (Transaction UID {commitment.transaction_uid})"
                self.completions.add(Delivery(job, detail, False, job.instance.size))
            elif destination is not None:
                reason = failed.get(uid, PROCESSING_FAILURE)
                why = "reported it failed" if uid in failed else "left it out of its report"
                self._send_again(
                    job,
                    destination,
                    f"{commitment.peer!r} {why}: {describe_reason(reason)}"
                    f" (Transaction UID {commitment.transaction_uid})",
                )
        self.completions.flush(30.0)
        self.records.close_commitment(commitment.id)

    def _jobs(self, commitment: Commitment) -> list[Job]:
        return self.records.jobs_by_id(
            [item.job_id for item in commitment.items if item.job_id is not None]
        )

    def _send_again(self, job: Job, destination: DestinationConfig, error: str) -> None:
        schedule = RetrySchedule(destination.retry)
        uid = job.instance.sop_instance_uid
        if schedule.gives_up(job.attempts):
            reason = f"gave up after {job.attempts} attempts: {error}"
            self.queue.dead_letter(job, reason)
            metrics.record_forwarded(destination.name, "failed")
            log.error("dead letter: SOP Instance UID %s for %r: %s", uid, destination.name, reason)
            return
        delay = schedule.delay(job.attempts)
        self.queue.retry_later(job, error, delay)
        metrics.record_forwarded(destination.name, "retry")
        log.warning(
            "SOP Instance UID %s for %r: %s; attempt %d, sending again in %.1f s",
            uid,
            destination.name,
            error,
            job.attempts,
            delay,
        )

    def link_report_handler(self, destination: DestinationConfig) -> EventReportHandler:
        """For our own association to the destination: a report that comes on it."""

        def handle(command: Command, syntax: str, data: bytes) -> int:
            return self.on_report(destination.ae_title, command, syntax, data).status

        return handle

    # The watcher: reports that never came.

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL):
            try:
                self.check_deadlines()
            except Exception:
                log.exception("storage commitment watcher: unexpected error")

    def check_deadlines(self) -> None:
        now = time.time()
        with self._lock:
            for commitment in self.records.open_commitments(Direction.SENT):
                if now < commitment.deadline - DUE_AFTER_DEADLINE:
                    continue
                destination = self.destinations.get(commitment.peer)
                error = (
                    f"no storage commitment report from {commitment.peer!r} within"
                    f" {self.report_timeout:g} s (Transaction UID {commitment.transaction_uid})"
                )
                if destination is not None:
                    for job in self._jobs(commitment):
                        self._send_again(job, destination, error)
                counters.record_report_retry("received")
                self.records.close_commitment(commitment.id)
                log.warning("%s: its instances are sent again", error)
