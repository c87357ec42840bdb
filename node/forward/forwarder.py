"""The forwarder: deliver queued instances to remote DICOM destinations by C-STORE.

Every destination has its own worker threads (`max_associations`), each holding at
most one association, so a destination that is down, slow or refusing never holds
up another. An association is reused for many instances and released after
`idle_timeout` seconds without work. For each instance the worker proposes the
destination's preferred transfer syntaxes, the received syntax and Explicit VR
Little Endian, each in its own presentation context, then sends in the first
accepted one in that order (a lossy instance as received, if accepted), transcoding
through the verified engine if needed. A destination that is unreachable or out of
resources is held (its jobs deferred) with exponential backoff; others go on.

A job is marked done only after the destination answered success or a warning,
so delivery is at least once: a crash between the answer and the commit sends
the instance again after the restart. Towards a destination with
`commitment = true` it is marked done only once the destination's Storage
Commitment report says committed (node.forward.commitment).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom.status import STATUS_CANCEL, STATUS_SUCCESS, STATUS_WARNING, code_to_category

from node.config.model import DestinationConfig, NodeConfig
from node.daemon import metrics
from node.dicom.syntaxes import LOSSY_OR_MIXED, resolve_syntax, syntax_name
from node.forward.commitment import STORAGE_COMMITMENT_CONTEXTS, CommitmentRequester
from node.forward.completions import Completions, Delivery
from node.forward.derived import DerivedFiles, Unshapable, Untranscodable
from node.forward.dicomweb import BatchResult, JobOutcome, StowSender
from node.forward.pacing import Associating
from node.ingest.identity import destination_identity
from node.ingest.spool import Spool
from node.jobs.interface import CommitmentRecords, JobQueue
from node.jobs.model import GroupClaim, Job, JobKind
from node.jobs.retry import RetrySchedule
from node.net.pdu import MAX_PRESENTATION_CONTEXTS
from node.net.storelink import (
    AssociationRejected,
    EventReportHandler,
    LinkError,
    Peer,
    Response,
    StoreAssociation,
    Timeouts,
    associate,
)
from node.net.tls import client_context
from node.shape import ShapeContext
from node.shape.build import build_shaping

log = logging.getLogger("node.forward")

POLL_INTERVAL = 1.0
CLAIM_BATCH = 16
ERROR_PAUSE = 5.0
STOP_GRACE = 5.0  # seconds a C-STORE in progress may take to finish at stop


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REFUSED = "refused"  # permanent: dead letter until an operator retries


STATUS_NAMES = {
    0x0000: "success",
    0x0001: "warning",
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0211: "unrecognized operation",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class (warning)",
    0xC000: "cannot understand",
}


def classify_status(code: int) -> Verdict:
    """What a C-STORE response status means for the job (categories: PS3.7 C, via pynetdicom)."""
    category = code_to_category(code)
    if category in (STATUS_SUCCESS, STATUS_WARNING):
        return Verdict.DELIVERED  # a warning means the destination stored the instance
    if code == 0x0111:
        # The destination already holds this SOP Instance UID: it has the instance
        # (a resend after a crash, with at-least-once delivery, lands here).
        return Verdict.DELIVERED
    if is_out_of_resources(code) or code == 0x0110 or category == STATUS_CANCEL:
        # Out of resources, a generic processing failure, a cancel: may pass later.
        return Verdict.RETRY
    return Verdict.REFUSED  # 0x0122, 0x0124, 0xA9xx, 0xCxxx, pending and anything unknown


def is_out_of_resources(code: int) -> bool:
    """0xA7xx (PS3.4 B.2.3): the destination's disk or memory is full; it refuses everything."""
    return 0xA700 <= code <= 0xA7FF


def describe_status(code: int) -> str:
    name = STATUS_NAMES.get(code) or STATUS_NAMES.get(code & 0xFF00, "")
    if not name and 0xC000 <= code <= 0xCFFF:
        name = "cannot understand"
    return f"status 0x{code:04X}" + (f" ({name})" if name else "")


class TransportError(Exception):
    """No association, or it broke: the destination may be fine again later."""


@dataclass
class Proposal:
    """Presentation contexts to request: per SOP class, one context per transfer syntax."""

    syntaxes: dict[str, tuple[UID, ...]] = field(default_factory=dict)

    def covers(self, sop_class: str, wanted: Sequence[UID]) -> bool:
        return set(wanted) <= set(self.syntaxes.get(sop_class, ()))

    def with_class(self, sop_class: str, wanted: Sequence[UID]) -> Proposal:
        merged = dict(self.syntaxes)
        merged[sop_class] = tuple(dict.fromkeys([*merged.get(sop_class, ()), *wanted]))
        if sum(len(s) for s in merged.values()) > MAX_PRESENTATION_CONTEXTS:
            merged = {sop_class: tuple(wanted)}  # too many classes: start over with this one
        return Proposal(merged)


def _client_tls(destination: DestinationConfig) -> tuple[ssl.SSLContext, str] | None:
    if not destination.tls.enabled:
        return None
    return client_context(destination.tls), destination.host


class DestinationHold:
    """Backoff shared by a destination's workers while its peer is unreachable.

    Trying every queued job against a peer that is down would only burn their attempt
    counts and flood the log, so after a transport failure the destination's pending jobs
    are deferred and no worker claims one until the hold ends, or until an operator runs
    `dicom-node queue retry`, which the workers notice within a second."""

    def __init__(self, queue: JobQueue, name: str, schedule: RetrySchedule) -> None:
        self.queue = queue
        self.name = name
        self.schedule = schedule
        self._lock = threading.Lock()
        self.streak = 0
        self.until = 0.0
        self.started = 0.0

    def begin(self) -> float:
        with self._lock:
            self.streak += 1
            delay = self.schedule.delay(self.streak)
            self.until = time.time() + delay
            self.queue.defer_target(JobKind.FORWARD, self.name, self.until)
            self.started = time.time()
            return delay

    def end(self) -> None:
        with self._lock:
            self.streak = 0
            self.until = 0.0

    def active(self) -> bool:
        with self._lock:
            if time.time() >= self.until:
                return False
            if self.queue.made_due_since(JobKind.FORWARD, self.name, self.started):
                log.info("retry requested for %r: ending its backoff early", self.name)
                self.until = 0.0
                return False
            # Instances that arrived during the hold wait for its end too (and say so).
            self.queue.defer_target(JobKind.FORWARD, self.name, self.until, new_only=True)
            return True


class DestinationLink:
    """At most one association to a destination: opened on demand, reused, released when idle."""

    def __init__(self, destination: DestinationConfig, node: NodeConfig) -> None:
        self.destination = destination
        self.node = node
        self.proposal = Proposal()
        self.association: StoreAssociation | None = None
        self.last_used = time.monotonic()
        self.on_event_report: EventReportHandler | None = None  # commitment = true

    @property
    def peer(self) -> str:
        d = self.destination
        return f"{d.ae_title}@{d.host}:{d.port}"

    def ready_for(self, sop_class: str, wanted: Sequence[UID]) -> bool:
        return self._usable() and self.proposal.covers(sop_class, wanted)

    def ensure(self, sop_class: str, wanted: Sequence[UID]) -> None:
        """Have an association whose proposal covers this SOP class and these syntaxes."""
        if self.ready_for(sop_class, wanted):
            return
        self.release()
        self.proposal = self.proposal.with_class(sop_class, wanted)
        self.association = self._associate(self.proposal)

    def _usable(self) -> bool:
        return self.association is not None and self.association.is_usable()

    def _associate(self, proposal: Proposal) -> StoreAssociation:
        d = self.destination
        # One syntax per context: the peer says yes or no to each, and we choose.
        contexts = [
            (sop_class, str(syntax))
            for sop_class, syntaxes in proposal.syntaxes.items()
            for syntax in syntaxes
        ]
        if d.commitment:
            contexts += STORAGE_COMMITMENT_CONTEXTS
        timeouts = Timeouts(
            acse=self.node.acse_timeout,
            dimse=self.node.dimse_timeout,
            network=self.node.network_timeout,
        )
        try:  # read for each association: a rotated passcode file needs no reload
            identity = destination_identity(d.username, d.passcode_file)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot read passcode_file {d.passcode_file}: {exc}") from None
        try:
            association = associate(
                Peer(d.ae_title, d.host, d.port),
                self.node.ae_title,
                contexts,
                max_pdu=self.node.max_pdu,
                timeouts=timeouts,
                tls=_client_tls(d),
                user_identity=identity,
            )
        except AssociationRejected as exc:
            ours = " and our destination username/passcode" if identity else ""
            raise TransportError(
                f"{exc}: check its AE title and whether it knows our calling AE title{ours}"
            ) from None
        except LinkError as exc:
            raise TransportError(str(exc)) from None
        self.last_used = time.monotonic()
        association.on_event_report = self.on_event_report
        log.debug("association to %s established", self.peer)
        return association

    def open_for(self, wanted: Sequence[tuple[str, Sequence[UID]]]) -> None:
        """A new association of its own, proposing every (SOP class, syntaxes) given: one
        series or study group goes over it (past 128 contexts, ensure() opens more)."""
        self.release()
        proposal = Proposal()
        for sop_class, syntaxes in wanted:
            proposal = proposal.with_class(sop_class, syntaxes)
        self.proposal = proposal
        self.association = self._associate(proposal)

    def accepted(self, sop_class: str) -> set[UID]:
        assert self.association is not None
        return {UID(syntax) for syntax in self.association.accepted(sop_class)}

    def send(self, path: Path) -> Response:
        """C-STORE one Part 10 file; returns the response or raises TransportError."""
        assert self.association is not None
        try:
            response = self.association.store(path)
        except LinkError as exc:
            self.association = None
            raise TransportError(str(exc)) from None
        self.last_used = time.monotonic()
        return response

    def idle_for(self) -> float:
        return time.monotonic() - self.last_used

    def release(self) -> None:
        if self.association is not None and self.association.established:
            self.association.release()
            log.debug("association to %s released", self.peer)
        self.association = None

    def abort(self) -> None:
        if self.association is not None:
            self.association.abort()
        self.association = None

    def interrupt(self) -> None:
        """From another thread: cut the connection, so a C-STORE waiting for its response
        ends now instead of after the whole DIMSE timeout."""
        association = self.association
        if association is not None:
            association.interrupt()


def proposed_syntaxes(destination: DestinationConfig, received: str) -> list[UID]:
    """Preferred syntaxes first, then the received one, then Explicit VR Little Endian."""
    preferred = [resolve_syntax(name) for name in destination.transfer_syntaxes]
    return list(dict.fromkeys([*preferred, UID(received), ExplicitVRLittleEndian]))


def sending_order(wanted: Sequence[UID], accepted: set[UID], received: UID) -> list[UID]:
    """Accepted syntaxes in the order to try them. A lossy instance goes as received when
    it can: decoding it only to re-encode it would inflate it and gain nothing."""
    choices = [syntax for syntax in wanted if syntax in accepted]
    if received in LOSSY_OR_MIXED and received in choices:
        choices.remove(received)
        choices.insert(0, received)
    return choices


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one attempt to deliver a job came to (not node.transcode's Outcome)."""

    verdict: Verdict
    detail: str
    warning: bool = False  # delivered with a warning status
    size: int = 0  # bytes sent
    peer_busy: bool = False  # out of resources: back off the whole destination


@dataclass(frozen=True)
class Shared:
    """What every worker of a forwarder uses."""

    queue: JobQueue
    derived: DerivedFiles
    completions: Completions
    stopping: threading.Event
    committer: CommitmentRequester | None = None
    # Per destination name: its workers waiting for an association (node.forward.pacing).
    associating: Mapping[str, Associating] = field(default_factory=dict)


class DestinationWorker:
    """One thread, one association at a time, jobs of one destination."""

    def __init__(
        self,
        destination: DestinationConfig,
        node: NodeConfig,
        shared: Shared,
        wake: threading.Event,
        hold: DestinationHold,
        index: int,
    ) -> None:
        self.destination = destination
        self.queue = shared.queue
        self.derived = shared.derived
        self.completions = shared.completions
        self.stopping = shared.stopping
        self.wake = wake
        self.schedule = RetrySchedule(destination.retry)
        self.link = DestinationLink(destination, node)
        # protocol = "dicomweb": whole batches by STOW-RS (node.forward.dicomweb), not self.link.
        self.web = (
            StowSender(destination, shared.derived) if destination.protocol == "dicomweb" else None
        )
        self.claims = destination.batch_size if self.web is not None else CLAIM_BATCH
        self.hold = hold
        self.associating = shared.associating.get(destination.name) or Associating(wake)
        # [destination.coerce] / [destination.deidentify]: this destination's own view.
        self.shaping = build_shaping(destination.coerce, destination.deidentify)
        self.thread = threading.Thread(
            target=self._loop, name=f"forward-{destination.name}-{index}", daemon=True
        )
        # commitment = true: delivered jobs of a batch wait here for its N-ACTION-RQ.
        self.committer = shared.committer if destination.commitment else None
        self.awaiting: list[Job] = []
        if self.committer is not None:
            self.link.on_event_report = self.committer.link_report_handler(destination)

    def _loop(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    self._step()
                except Exception:
                    # The queue's database busy past its timeout, a bug: the destination
                    # must not stop for good. Unfinished jobs are requeued at restart.
                    log.exception("forwarder for %r: unexpected error", self.destination.name)
                    self.link.abort()
                    self.stopping.wait(ERROR_PAUSE)
        finally:
            self.link.release()
            if self.web is not None:
                self.web.release()

    def _step(self) -> None:
        if self.hold.active():
            self.link.release()
            self.stopping.wait(POLL_INTERVAL)
            return
        group = self.queue.claim_group(JobKind.FORWARD, self.destination.name)
        if group is not None:
            self._send_group(group)
            self._request_commitment()  # after an early return: may send them again
            return
        # Claimed in batches: a claim waits for the queue's lock, which a durable commit
        # holds through its fsync; one wait per batch instead of one per instance. Without
        # an association, one job: the peer may keep us waiting for one (node.forward.pacing)
        # while siblings could send the rest.
        connected = self.web is not None or self.link.association is not None
        limit = self.claims if connected else 1
        jobs = self.queue.claim(JobKind.FORWARD, target=self.destination.name, limit=limit)
        if jobs:
            self._run_batch(jobs)
        else:
            self._wait_for_work()

    def _run_batch(self, jobs: Sequence[Job]) -> None:
        if self.web is not None:
            self._run_web_batch(jobs)
            return
        try:
            self._run_jobs(jobs)
        finally:
            self._request_commitment()

    def _request_commitment(self) -> None:
        """commitment = true: ask for the jobs just delivered, on the association they went on."""
        if self.committer is not None and self.awaiting:
            awaiting, self.awaiting = self.awaiting, []
            self.committer.request(self.destination, self.link.association, awaiting)

    def _run_jobs(self, jobs: Sequence[Job]) -> None:
        for index, job in enumerate(jobs):
            if self.stopping.is_set() or self.hold.active():
                # Not tried: they go back with their attempt count as it was.
                self.queue.release(jobs[index:])
                return
            if not self.run(job, untried=jobs[index + 1 :]):
                return  # the destination is held; run() gave the untried jobs back

    def _wait_for_work(self) -> None:
        if self.link.association is not None and (
            self.link.idle_for() >= self.destination.idle_timeout
            or self.associating.sibling_waiting()  # the peer may serve one association only
        ):
            self.link.release()
        elif self.committer is not None and self.link.association is not None:
            # A Storage Commitment report may come on our association while it idles.
            self.link.association.is_usable()
        due = self.queue.next_due_in(JobKind.FORWARD, self.destination.name)
        timeout = POLL_INTERVAL if due is None else min(POLL_INTERVAL, max(due, 0.01))
        self.wake.wait(timeout)
        self.wake.clear()

    def run(self, job: Job, untried: Sequence[Job] = ()) -> bool:
        """Deliver one job; False if the destination is now held (then `untried`, claimed
        jobs of the same batch, are given back first, so the hold defers them too)."""
        try:
            outcome = self._deliver(job)
        except TransportError as exc:
            self._unreachable(job, str(exc), untried)
            return False
        except Exception as exc:  # a bug or an I/O error: keep the job, try again later
            log.exception("forwarding job %d to %r failed", job.id, self.destination.name)
            outcome = DeliveryOutcome(Verdict.RETRY, f"{type(exc).__name__}: {exc}")
        if outcome.peer_busy:
            # A full disk there refuses every instance.
            self._unreachable(job, outcome.detail, untried)
            return False
        self.hold.end()
        self._record(job, outcome)
        return True

    def _deliver(self, job: Job) -> DeliveryOutcome:
        instance = job.instance
        wanted = proposed_syntaxes(self.destination, instance.transfer_syntax)
        if not self.link.ready_for(instance.sop_class_uid, wanted):
            with self.associating.waiting():
                self.link.ensure(instance.sop_class_uid, wanted)
        accepted = self.link.accepted(instance.sop_class_uid)
        choices = sending_order(wanted, accepted, UID(instance.transfer_syntax))
        if not choices:
            return DeliveryOutcome(
                Verdict.REFUSED,
                f"{self.link.peer} accepted no presentation context for SOP class"
                f" {_class_name(instance.sop_class_uid)} (proposed "
                + ", ".join(syntax_name(s) for s in wanted)
                + ")",
            )
        path, syntax, notes = self._file_in_first_possible(job, choices)
        if path is None:
            return DeliveryOutcome(Verdict.REFUSED, "; ".join(notes))
        response = self.link.send(path)
        code = response.status
        verdict = classify_status(code)
        detail = f"{describe_status(code)} from {self.link.peer} in {syntax_name(syntax)}"
        if response.error_comment and verdict is not Verdict.DELIVERED:
            detail += f": {_printable(response.error_comment)}"
        if notes and verdict is Verdict.DELIVERED:
            detail += f" (fallback: {'; '.join(notes)})"
        if self.shaping is not None:
            detail += f" ({self.shaping.describe()})"
        return DeliveryOutcome(
            verdict,
            detail,
            warning=code != 0x0000,
            size=path.stat().st_size,
            peer_busy=is_out_of_resources(code),
        )

    def _file_in_first_possible(
        self, job: Job, choices: Sequence[UID]
    ) -> tuple[Path | None, UID, list[str]]:
        instance = job.instance
        if not instance.spool_path.exists():
            return (
                None,
                UID(instance.transfer_syntax),
                [f"spool file {instance.spool_path} is missing (removed by hand?)"],
            )
        notes: list[str] = []
        for syntax in choices:
            try:
                path = self.derived.get(
                    instance.spool_path,
                    instance.transfer_syntax,
                    syntax,
                    allow_lossy=self.destination.allow_lossy,
                    shaping=self.shaping,
                    context=ShapeContext(instance.calling_ae_title, instance.called_ae_title),
                )
                return path, syntax, notes
            except Unshapable as exc:
                return None, syntax, [str(exc)]  # the same in every syntax
            except Untranscodable as exc:
                notes.append(str(exc))
        return None, UID(instance.transfer_syntax), notes

    def _unreachable(self, job: Job, error: str, untried: Sequence[Job] = ()) -> None:
        self._record(job, DeliveryOutcome(Verdict.RETRY, error))
        if untried:
            self.queue.release(untried)
        delay = self.hold.begin()
        log.warning(
            "destination %r unreachable or out of resources: holding its jobs for %.1f s",
            self.destination.name,
            delay,
        )

    def _send_group(self, claim: GroupClaim) -> None:
        """A dispatched series or study group over one association of its own, in the order
        claimed (Series Number, Instance Number). A member refused or to be retried follows
        the usual rules on its own and holds the group's delivered state; a broken
        association gives the rest back to the group, sent as one after the hold."""
        if self.web is not None:
            self._send_web_group(claim)
            return
        jobs, group = claim.jobs, claim.group
        wanted = [
            (
                job.instance.sop_class_uid,
                proposed_syntaxes(self.destination, job.instance.transfer_syntax),
            )
            for job in jobs
        ]
        try:
            self.link.open_for(wanted)
        except TransportError as exc:
            self._group_unreachable(jobs, str(exc))
            return
        log.info(
            "sending %s %s (version %d, %d instances) of Study Instance UID %s to %r"
            " over one association",
            group.level,
            group.series_instance_uid or "(whole study)",
            group.version,
            len(jobs),
            group.study_instance_uid,
            self.destination.name,
        )
        for index, job in enumerate(jobs):
            if self.stopping.is_set():
                self.queue.return_to_group(jobs[index:])
                return
            try:
                outcome = self._deliver(job)
            except TransportError as exc:
                self._group_unreachable(jobs[index:], str(exc))
                return
            except Exception as exc:  # a bug or an I/O error: keep the job, try again later
                log.exception("forwarding job %d to %r failed", job.id, self.destination.name)
                outcome = DeliveryOutcome(Verdict.RETRY, f"{type(exc).__name__}: {exc}")
            if outcome.peer_busy:
                self._group_unreachable(jobs[index:], outcome.detail)
                return
            self.hold.end()
            self._record(job, outcome)
        self._request_commitment()
        self.link.release()

    def _group_unreachable(self, jobs: Sequence[Job], error: str) -> None:
        self.link.abort()
        self.queue.return_to_group(jobs, error)
        delay = self.hold.begin()
        log.warning(
            "destination %r unreachable or out of resources during a group (%s): %d of its"
            " instances wait for the group to be sent again in %.1f s",
            self.destination.name,
            error,
            len(jobs),
            delay,
        )

    def _record(self, job: Job, outcome: DeliveryOutcome) -> None:
        uid = job.instance.sop_instance_uid
        name = self.destination.name
        if outcome.verdict is Verdict.DELIVERED and self.committer is not None:
            self.awaiting.append(job)  # done once the destination's report says committed
        elif outcome.verdict is Verdict.DELIVERED:
            # Committed (then logged, spool file deleted) by the completions thread.
            self.completions.add(Delivery(job, outcome.detail, outcome.warning, outcome.size))
        elif outcome.verdict is Verdict.REFUSED:
            self.queue.dead_letter(job, outcome.detail)
            metrics.record_forwarded(name, "failed")
            log.error("dead letter: SOP Instance UID %s for %r: %s", uid, name, outcome.detail)
        else:
            self._retry_or_give_up(job, outcome.detail)

    def _retry_or_give_up(self, job: Job, error: str) -> None:
        uid = job.instance.sop_instance_uid
        name = self.destination.name
        attempt = job.attempts
        if self.schedule.gives_up(attempt):
            reason = f"gave up after {attempt} attempts: {error}"
            self.queue.dead_letter(job, reason)
            metrics.record_forwarded(name, "failed")
            log.error("dead letter: SOP Instance UID %s for %r: %s", uid, name, reason)
            return
        delay = self.schedule.delay(attempt)
        self.queue.retry_later(job, error, delay)
        metrics.record_forwarded(name, "retry")
        log.warning(
            "SOP Instance UID %s for %r: %s; attempt %d, retrying in %.1f s",
            uid,
            name,
            error,
            attempt,
            delay,
        )

    def _run_web_batch(self, jobs: Sequence[Job]) -> None:
        """A batch by STOW-RS: the same records, retries and hold as C-STORE, per job."""
        result = self._web_deliver(jobs)
        for done in result.outcomes:
            self._record_web(done)
        if result.untried:
            self.queue.release(result.untried)
        self._web_hold(result.hold)

    def _send_web_group(self, claim: GroupClaim) -> None:
        """A dispatched series or study group by STOW-RS, in the order claimed; when the
        destination must wait, what was not delivered goes back to the group, sent again
        as one after the hold (as for DIMSE)."""
        result = self._web_deliver(claim.jobs)
        waiting = result.hold is not None
        back = [d.job for d in result.outcomes if waiting and d.verdict == Verdict.RETRY]
        for done in result.outcomes:
            if done.job not in back:
                self._record_web(done)
        self.queue.return_to_group([*back, *result.untried], result.hold)
        self._web_hold(result.hold)

    def _web_deliver(self, jobs: Sequence[Job]) -> BatchResult:
        assert self.web is not None
        try:
            return self.web.deliver(jobs, self.stopping)
        except Exception as exc:  # a bug or an I/O error: keep the jobs, try again later
            log.exception("STOW-RS of %d jobs to %r failed", len(jobs), self.destination.name)
            error = f"{type(exc).__name__}: {exc}"
            return BatchResult([JobOutcome(job, Verdict.RETRY, error) for job in jobs])

    def _record_web(self, done: JobOutcome) -> None:
        self._record(
            done.job, DeliveryOutcome(Verdict(done.verdict), done.detail, done.warning, done.size)
        )

    def _web_hold(self, reason: str | None) -> None:
        if reason is None:
            self.hold.end()
            return
        delay = self.hold.begin()
        log.warning("destination %r held for %.1f s: %s", self.destination.name, delay, reason)


def _printable(text: str, limit: int = 64) -> str:
    """A peer's Error Comment (LO, 64 characters) as one harmless line of log and status."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _class_name(sop_class: str) -> str:
    name = UID(sop_class).name
    return f"{name} ({sop_class})" if name and name != sop_class else sop_class


class Forwarder:
    """All destinations' workers. `wake()` is called by intake after each recorded instance."""

    def __init__(
        self,
        destinations: Sequence[DestinationConfig],
        node: NodeConfig,
        queue: JobQueue,
        spool: Spool,
        derived: DerivedFiles,
        commitments: CommitmentRecords | None = None,
        report_timeout: float = 3600.0,
    ) -> None:
        self.queue = queue
        self.derived = derived
        self._stopping = threading.Event()
        self.completions = Completions(queue, spool)
        self.committer = (
            CommitmentRequester(
                destinations, queue, commitments, self.completions, report_timeout, node.ae_title
            )
            if commitments is not None and any(d.commitment for d in destinations)
            else None
        )
        self._wakes: Mapping[str, threading.Event] = {
            d.name: threading.Event() for d in destinations
        }
        associating = {name: Associating(wake) for name, wake in self._wakes.items()}
        shared = Shared(
            queue, derived, self.completions, self._stopping, self.committer, associating
        )
        self.workers = [
            DestinationWorker(d, node, shared, self._wakes[d.name], hold, index)
            for d, hold in self._holds(queue, destinations)
            for index in range(d.max_associations)
        ]

    @staticmethod
    def _holds(
        queue: JobQueue, destinations: Sequence[DestinationConfig]
    ) -> list[tuple[DestinationConfig, DestinationHold]]:
        return [(d, DestinationHold(queue, d.name, RetrySchedule(d.retry))) for d in destinations]

    def wake(self) -> None:
        for event in self._wakes.values():
            event.set()

    def start(self) -> None:
        self.derived.prepare()
        self._dead_letter_unknown_destinations()
        self.completions.start()
        if self.committer is not None:
            self.committer.start()
        for worker in self.workers:
            worker.thread.start()

    def _dead_letter_unknown_destinations(self) -> None:
        for target in self.queue.open_targets(JobKind.FORWARD):
            if target not in self._wakes:
                count = self.queue.dead_letter_target(
                    JobKind.FORWARD,
                    target,
                    f"no [[destination]] named {target!r} in the current config",
                )
                log.error(
                    "%d jobs for destination %r, which is no longer configured, are now dead"
                    " letters: add it back and run `dicom-node queue retry --failed`, or"
                    " `dicom-node queue purge`",
                    count,
                    target,
                )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming; a C-STORE in progress gets a few seconds to finish, then its
        association is aborted: at-least-once delivery sends it again after the restart."""
        self._stopping.set()
        self.wake()
        self._join(min(STOP_GRACE, timeout / 2))
        for worker in self.workers:
            if worker.thread.is_alive():
                log.warning("aborting the association of %s to stop", worker.thread.name)
                worker.link.interrupt()
                if worker.web is not None:
                    worker.web.interrupt()
        self._join(timeout / 2)
        if self.committer is not None:
            self.committer.stop()
        # Deliveries the peers confirmed are committed before the queue closes.
        self.completions.stop()

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
