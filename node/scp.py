"""The Storage SCP: admit associations, negotiate presentation contexts, hand C-STOREs to intake.

pynetdicom does the protocol. This module decides who may associate (calling
AE allowlist, called AE check, association limit, timeouts), which transfer
syntaxes are accepted and in what order, and keeps the event handlers small:
the C-STORE handler only passes the encoded bytes to intake.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from threading import Lock

from pydicom.uid import UID
from pynetdicom import AE, _config, acse, evt
from pynetdicom.presentation import (
    PresentationContext,
    negotiate_as_acceptor,
    negotiate_unrestricted,
)
from pynetdicom.sop_class import Verification

from node.config import Config
from node.intake import Intake, Status, StoreRequest, describe_request

log = logging.getLogger("node.scp")


def configure_ae(ae: AE, config: Config) -> None:
    """Apply the settings that may change on a config reload."""
    ae.ae_title = config.node.ae_title
    ae.maximum_associations = config.node.max_associations
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


class StorageSCP:
    """The listening side of the node: an AE whose handlers feed intake."""

    def __init__(self, config: Config, intake: Intake) -> None:
        self.config = config
        self.intake = intake
        self.ae = AE()
        self.ae.add_supported_context(Verification)
        configure_ae(self.ae, config)
        StorageNegotiation.install()
        self._stats: dict[int, AssociationStats] = {}
        self._stats_lock = Lock()
        self._server = None

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
        address = (self.config.node.host, self.config.node.port)
        self._server = self.ae.start_server(address, block=False, evt_handlers=self.handlers)
        log.info("listening on %s:%d as %r", *address, self.config.node.ae_title)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def reconfigure(self, config: Config) -> None:
        self.config = config
        configure_ae(self.ae, config)

    def handle_echo(self, event: evt.Event) -> int:
        return 0x0000

    def handle_store(self, event: evt.Event) -> int:
        request = _store_request(event)
        result = self.intake.receive(request)
        stats = self._stats_for(event)
        if result.status == Status.SUCCESS:
            stats.received += 1
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
        with self._stats_lock:
            self._stats[id(event.assoc)] = AssociationStats()
        assoc = event.assoc
        log.debug(
            "association from %s:%s %r -> %r, %d presentation contexts accepted",
            assoc.requestor.address,
            assoc.requestor.port,
            assoc.requestor.ae_title,
            assoc.acceptor.ae_title,
            len(assoc.accepted_contexts),
        )

    def handle_closed(self, event: evt.Event) -> None:
        with self._stats_lock:
            stats = self._stats.pop(id(event.assoc), AssociationStats())
        assoc = event.assoc
        how = "released" if event.event == evt.EVT_RELEASED else "aborted"
        log.info(
            "association %s: %s:%s %r -> %r, %d instances stored, %d refused, %.1f s",
            how,
            assoc.requestor.address,
            assoc.requestor.port,
            assoc.requestor.ae_title,
            assoc.acceptor.ae_title,
            stats.received,
            stats.failed,
            time.monotonic() - stats.started,
        )

    def handle_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        log.warning(
            "association rejected: %s:%s calling AE %r, called AE %r (check security.allowed_calling_aets,"
            " node.ae_title and node.max_associations)",
            assoc.requestor.address,
            assoc.requestor.port,
            assoc.requestor.ae_title,
            assoc.acceptor.ae_title,
        )

    def _stats_for(self, event: evt.Event) -> AssociationStats:
        with self._stats_lock:
            return self._stats.setdefault(id(event.assoc), AssociationStats())


def _store_request(event: evt.Event) -> StoreRequest:
    request = event.request
    return StoreRequest(
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        transfer_syntax=UID(event.context.transfer_syntax),
        calling_ae_title=event.assoc.requestor.ae_title,
        called_ae_title=_called_ae_title(event),
        # A view, not a copy: the bytes go straight from pynetdicom's buffer to the spool.
        dataset=request.DataSet.getbuffer(),
    )


def _called_ae_title(event: evt.Event) -> str:
    # acceptor.ae_title is our own title; the one the peer asked for is in its request.
    requested = getattr(event.assoc.requestor.primitive, "called_ae_title", None)
    return str(requested or event.assoc.acceptor.ae_title).strip()
