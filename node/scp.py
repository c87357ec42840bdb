"""The Storage SCP: the AE, its presentation contexts, and small handlers that feed intake.

pynetdicom does the protocol; node.listener owns the sockets and node.admission
decides who may associate. This module sets the AE up (called AE check,
timeouts, PDU size), decides which transfer syntaxes are accepted and in what
order, and keeps the event handlers small: the C-STORE handler only passes the
received bytes to intake, it never decodes pixels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from threading import Lock

from pydicom.uid import UID
from pynetdicom import AE, Association, _config, acse, evt
from pynetdicom.presentation import (
    PresentationContext,
    negotiate_as_acceptor,
    negotiate_unrestricted,
)
from pynetdicom.sop_class import Verification

from node import admission, metrics
from node.config import Config
from node.durable import FileRegion
from node.intake import Intake, Status, StoreRequest, describe_request
from node.listener import Listeners
from node.netio import (
    ReceiveFailed,
    discard_unfinished,
    install_fast_reads,
    receive_to_disk,
    received_dataset,
)
from node.syntaxes import syntax_name

log = logging.getLogger("node.scp")

# Inside the spool folder: where pynetdicom writes datasets while they arrive.
RECEIVING_DIR = ".receiving"


def configure_ae(ae: AE, config: Config) -> None:
    """Apply the settings that may change on a config reload."""
    ae.ae_title = config.node.ae_title
    admission.configure(ae, config)  # association limits and the calling AE allowlist
    ae.maximum_pdu_size = config.node.max_pdu
    ae.acse_timeout = config.node.acse_timeout
    ae.dimse_timeout = config.node.dimse_timeout
    ae.network_timeout = config.node.network_timeout
    ae.require_called_aet = config.security.require_called_aet
    ae.require_calling_aet = list(config.security.allowed_calling_aets)
    StorageNegotiation.transfer_syntaxes = tuple(config.accept.transfer_syntaxes)


class StorageNegotiation:
    """Accept every storage SOP class, private and unknown ones included, in our syntax order.

    pynetdicom's unrestricted mode takes whatever syntax the requestor lists
    first; we replace it so the configured preference order is honoured.
    """

    transfer_syntaxes: tuple[UID, ...] = ()

    @classmethod
    def install(cls) -> None:
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        acse.negotiate_unrestricted = cls.negotiate  # type: ignore[attr-defined]

    @classmethod
    def negotiate(
        cls,
        rq_contexts: list[PresentationContext],
        ac_contexts: list[PresentationContext],
        roles: dict | None = None,
    ) -> tuple[list[PresentationContext], list]:
        storage_ids = _storage_like_ids(rq_contexts)
        storage_like = [cx for cx in rq_contexts if cx.context_id in storage_ids]
        others = [cx for cx in rq_contexts if cx.context_id not in storage_ids]
        accepted = [cls._storage_context(cx.abstract_syntax) for cx in storage_like]
        result, result_roles = negotiate_as_acceptor(storage_like, accepted, roles)
        other_result, other_roles = negotiate_as_acceptor(others, ac_contexts, roles)
        contexts = sorted(result + other_result, key=lambda cx: cx.context_id or 0)
        return contexts, result_roles + other_roles

    @classmethod
    def _storage_context(cls, abstract_syntax: str | None) -> PresentationContext:
        context = PresentationContext()
        context.abstract_syntax = abstract_syntax
        context.transfer_syntax = list(cls.transfer_syntaxes)
        return context


def _storage_like_ids(contexts: Sequence[PresentationContext]) -> set[int | None]:
    # Reuse pynetdicom's own notion of "storage-like" (a storage, private or
    # unknown SOP class): its unrestricted negotiator accepts exactly those.
    probe, _ = negotiate_unrestricted(list(contexts), [], None)
    return {cx.context_id for cx in probe if cx.result == 0x00}


@dataclass
class AssociationStats:
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    failed: int = 0
    received_bytes: int = 0
    contexts: str = "no contexts negotiated"
    established: bool = False


def contexts_summary(assoc: Association) -> str:
    """'3/5 contexts accepted (ExplicitVRLittleEndian, JPEGLSLossless)': what was negotiated."""
    accepted = assoc.accepted_contexts
    proposed = len(accepted) + len(assoc.rejected_contexts)
    syntaxes = sorted({syntax_name(str(cx.transfer_syntax[0])) for cx in accepted})
    return f"{len(accepted)}/{proposed} contexts accepted ({', '.join(syntaxes) or 'none'})"


def rejection_reason(assoc: Association) -> str:
    """Why pynetdicom rejected an association, re-derived from the AE's settings (the event
    does not carry the A-ASSOCIATE-RJ diagnostic)."""
    refused_by_admission = getattr(assoc, "node_refusal", None)
    if refused_by_admission:
        return str(refused_by_admission)
    ae = assoc.ae
    calling = str(assoc.requestor.ae_title).strip()
    allowed = [aet.strip() for aet in ae.require_calling_aet]
    if allowed and calling not in allowed:
        return "calling_ae_not_allowed"
    called = _called_ae_title_of(assoc)
    if ae.require_called_aet and called != str(ae.ae_title).strip():
        return "called_ae_unknown"
    # Association limits are node.admission's refusals: they carry node_refusal.
    return "other"


class StorageSCP:
    """The listening side of the node: an AE whose handlers feed intake."""

    def __init__(self, config: Config, intake: Intake, receiving_dir: str = RECEIVING_DIR) -> None:
        self.config = config
        self.intake = intake
        self.ae = AE()
        self.ae.add_supported_context(Verification)
        configure_ae(self.ae, config)
        StorageNegotiation.install()
        install_fast_reads()
        receive_to_disk(config.spool_dir / receiving_dir)
        self._stats: dict[int, AssociationStats] = {}
        self._stats_lock = Lock()
        self._listeners: Listeners | None = None

    @property
    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ESTABLISHED, self.handle_established),
            (evt.EVT_RELEASED, self.handle_closed),
            (evt.EVT_ABORTED, self.handle_closed),
            (evt.EVT_REJECTED, self.handle_rejected),
        ]

    def start(self) -> None:
        self._listeners = Listeners(self.ae, self.handlers)
        self._listeners.start(self.config)

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Close the listening socket, then give open associations `drain_timeout` s to finish.

        pynetdicom's server.shutdown() leaves running associations alone (their
        threads are daemons that would die with the process), so we wait for
        them here; the ones still open after the bound are aborted. An abort
        loses nothing: an instance is acknowledged only once it is durable, and
        the sender keeps and retries the unacknowledged ones.
        """
        if self._listeners is not None:
            self._listeners.close()
            self._listeners = None
        deadline = time.monotonic() + drain_timeout
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = self.active_associations()
        if remaining:
            log.warning(
                "%d associations still open after %.0f s: aborting them (their senders will"
                " retry what was not acknowledged)",
                len(remaining),
                drain_timeout,
            )
            for assoc in remaining:
                assoc.abort()
            for assoc in remaining:
                assoc.join(5.0)

    def active_associations(self) -> list[Association]:
        return [assoc for assoc in self.ae.active_associations if assoc.is_acceptor]

    def reconfigure(self, config: Config) -> None:
        self.config = config
        configure_ae(self.ae, config)
        if self._listeners is not None:
            self._listeners.reconfigure(config)

    def handle_echo(self, event: evt.Event) -> int:
        return 0x0000

    def handle_store(self, event: evt.Event) -> int:
        try:
            with received_dataset(event.request) as (dataset, on_disk):
                return self._answer_store(event, _store_request(event, dataset, on_disk))
        except ReceiveFailed as exc:
            log.warning("refused a C-STORE: cannot write the arriving dataset: %s", exc.strerror)
            return int(Status.OUT_OF_RESOURCES)

    def _answer_store(self, event: evt.Event, request: StoreRequest) -> int:
        result = self.intake.receive(request)
        metrics.record_received(result.status.name.lower(), len(request.dataset))
        stats = self._stats_for(event)
        if result.status == Status.SUCCESS:
            stats.received += 1
            stats.received_bytes += len(request.dataset)
            log.debug("received %s", describe_request(request))
        else:
            stats.failed += 1
            log.warning(
                "refused %s with status 0x%04X: %s",
                describe_request(request),
                result.status,
                result.reason,
            )
        return int(result.status)

    def handle_established(self, event: evt.Event) -> None:
        assoc = event.assoc
        stats = AssociationStats(contexts=contexts_summary(assoc), established=True)
        with self._stats_lock:
            self._stats[id(assoc)] = stats
        metrics.record_association_accepted()
        log.debug(
            "association from %s:%s %r -> %r, %s",
            assoc.requestor.address,
            assoc.requestor.port,
            assoc.requestor.ae_title,
            _called_ae_title_of(assoc),
            stats.contexts,
        )

    def handle_closed(self, event: evt.Event) -> None:
        discard_unfinished(event.assoc)
        with self._stats_lock:
            stats = self._stats.pop(id(event.assoc), AssociationStats())
        assoc = event.assoc
        aborted = event.event != evt.EVT_RELEASED
        if stats.established:
            metrics.record_association_closed(aborted)
        log.info(
            "association %s: %s:%s %r -> %r, %s, %d instances received (%.2f MB), %d refused, %.1f s",
            "aborted" if aborted else "released",
            assoc.requestor.address,
            assoc.requestor.port,
            assoc.requestor.ae_title,
            _called_ae_title_of(assoc),
            stats.contexts,
            stats.received,
            stats.received_bytes / 1e6,
            stats.failed,
            time.monotonic() - stats.started,
        )

    def handle_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        reason = rejection_reason(assoc)
        metrics.record_association_rejected(reason)
        if getattr(assoc, "node_refusal", None):
            return  # node.admission refused it and has logged why, with the setting to change
        log.warning(
            "association rejected (%s): %s:%s calling AE %r, called AE %r (%s)",
            reason,
            assoc.requestor.address,
            assoc.requestor.port,
            assoc.requestor.ae_title,
            _called_ae_title_of(assoc),
            _REJECTION_ADVICE.get(reason, _REJECTION_ADVICE["other"]),
        )

    def _stats_for(self, event: evt.Event) -> AssociationStats:
        with self._stats_lock:
            return self._stats.setdefault(id(event.assoc), AssociationStats())


def _store_request(
    event: evt.Event, dataset: bytes | memoryview, on_disk: FileRegion | None
) -> StoreRequest:
    request = event.request
    return StoreRequest(
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        transfer_syntax=UID(event.context.transfer_syntax),
        calling_ae_title=event.assoc.requestor.ae_title,
        called_ae_title=_called_ae_title_of(event.assoc),
        # A view, not a copy: the bytes go straight from pynetdicom's buffer to the spool.
        dataset=dataset,
        dataset_file=on_disk,
    )


def _called_ae_title_of(assoc: Association) -> str:
    # acceptor.ae_title is our own title; the one the peer asked for is in its request.
    requested = getattr(assoc.requestor.primitive, "called_ae_title", None)
    return str(requested or assoc.acceptor.ae_title).strip()


_REJECTION_ADVICE = {
    "calling_ae_not_allowed": "add the calling AE to security.allowed_calling_aets if it is trusted",
    "called_ae_unknown": "the sender must call us as node.ae_title, or set"
    " security.require_called_aet = false",
    "too_many_associations": "the sender should retry later; raise node.max_associations"
    " if this is routine",
    "too_many_for_calling_ae": "the sender should retry later; raise"
    " security.max_associations_per_calling_aet if this is routine",
    "other": "see the sender's log; run with node.log_level = \"DEBUG\" for pynetdicom's view",
}
