"""The pynetdicom acceptor (`node.acceptor = "pynetdicom"`): pynetdicom speaks the protocol.

pynetdicom is the reference implementation the node was first built on, kept
as a second acceptor so that our own Upper Layer (node.association) can be
checked and timed against it. Everything after the protocol is shared with the
native acceptor: node.scp.StorageSCP's handlers decide admission (node.admission),
negotiate in our transfer syntax order (StorageNegotiation), run intake and
count and log, so the statuses, Error Comments and reject reasons are the same.

With `STORE_RECV_CHUNKED_DATASET` pynetdicom streams each dataset into a
NamedTemporaryFile in the default temp folder. We give it an ArrivingFile
instead, the native acceptor's ArrivingDataset behind the file interface: a
dataset stays in memory up to 8 MiB and spills into our receiving folder, beside
the spool, above that; a full disk is remembered and answered Out of Resources.
Intake writes the spool file with fsync and commits the queue before the handler
returns, which is when pynetdicom closes (and so deletes) the arriving file.

Left to pynetdicom, so different from the native acceptor: the listener (a
thread per connection from its first byte; with TLS the handshake runs in the
accept thread), no PDU size checks while receiving (past limits.max_instance_size
the bytes are dropped and the answer is 0xA700, where ours aborts at twice the
limit), and `node.receivers = 1` only.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pynetdicom.dimse_messages
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association as PynetdicomAssociation
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Verification,
    register_uid,
    uid_to_service_class,
)
from pynetdicom.transport import ThreadedAssociationServer

from node.config.model import Config
from node.ingest.intake import Intake, Status
from node.ingest.receiving import ArrivingDataset
from node.ingest.scp import RECEIVING_DIR, StorageNegotiation, StorageSCP, drain
from node.ingest.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.net import dimse, pdu
from node.net.tls import server_context

log = logging.getLogger("node.pynetdicom_acceptor")

# pynetdicom's DUL sleeps this long in each loop, 1 ms by default: about 250 CT/s at best.
# Private, hence the pin on pynetdicom ~= 3.0; 0.1 ms measured 436-493 CT/s.
RUN_LOOP_DELAY = 0.0001
# Our admission counts associations; pynetdicom's own limit only has to stay out of its way.
UNLIMITED = 1_000_000
# Preamble, "DICM", then (0002,0000) UL 4 and its value: the File Meta group length.
META_LENGTH_END = 128 + 4 + 8 + 4


class ArrivingFile:
    """What pynetdicom takes for the NamedTemporaryFile it writes a C-STORE dataset to.

    pynetdicom writes a File Meta Information group first, then the dataset
    fragments. The group is skipped (the spool writes its own, naming the
    calling AE); the dataset goes to an ArrivingDataset. `name` is never
    created: pynetdicom's unlink of it after the handler fails quietly, and
    close() deletes the spill file, if any.
    """

    def __init__(self, folder: Path, max_size: int = 0) -> None:
        self.dataset = ArrivingDataset(folder)
        self.max_size = max_size
        self.name = str(folder / f"pynetdicom-{uuid.uuid4().hex}.dcm")
        self._meta = bytearray()
        self._meta_size = META_LENGTH_END  # until the group length is known

    @property
    def file(self) -> ArrivingFile:
        return self  # pynetdicom calls .file.flush() after each fragment

    def flush(self) -> None:
        pass  # nothing is buffered; durability is the spool's job

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        while view and len(self._meta) < self._meta_size:
            taken = view[: self._meta_size - len(self._meta)]
            self._meta += taken
            view = view[len(taken) :]
            if len(self._meta) == META_LENGTH_END:
                self._meta_size = META_LENGTH_END + _group_length(self._meta)
        if view:
            self._check_size(len(view))
            self.dataset.region(len(view))[:] = view
            self.dataset.filled(len(view))
        return len(data)

    def _check_size(self, more: int) -> None:
        """Past limits.max_instance_size the rest is counted, not kept (answered 0xA700)."""
        if (
            self.max_size
            and self.dataset.error is None
            and self.dataset.size + more > self.max_size
        ):
            self.dataset.error = OSError(
                errno.EFBIG,
                f"instance is over limits.max_instance_size={self.max_size} bytes",
            )

    def close(self) -> None:
        self.dataset.discard()


def _group_length(head: bytes | bytearray) -> int:
    tag, vr, length, value = struct.unpack_from("<4s2sHL", head, 132)
    if head[128:132] != b"DICM" or tag != b"\x02\x00\x00\x00" or vr != b"UL" or length != 4:
        # pynetdicom always writes the group length first; anything else is a version we
        # have not checked, and guessing where the dataset starts could corrupt it.
        raise RuntimeError("pynetdicom wrote a File Meta group we do not recognise")
    return int(value)


class ArrivingFiles:
    """Stands in for tempfile.NamedTemporaryFile inside pynetdicom.dimse_messages."""

    def __init__(self, folder: Path, max_size: int = 0) -> None:
        self.folder = folder
        self.max_size = max_size

    def __call__(self, *args: object, **kwargs: object) -> ArrivingFile:
        return ArrivingFile(self.folder, self.max_size)


@dataclass(eq=False)  # one per association, compared by identity like ours
class PeerAssociation:
    """A pynetdicom association as node.scp's handlers see it (scp.AssociationView)."""

    assoc: PynetdicomAssociation
    established: bool = False
    aborted: bool = False
    user_identity_response: bytes | None = None  # set by admit(), sent in the A-ASSOCIATE-AC

    @property
    def peer(self) -> tuple[str, int]:
        return str(self.assoc.requestor.address), int(self.assoc.requestor.port)

    @property
    def address(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}"

    @property
    def calling_ae_title(self) -> str:
        primitive = self.assoc.requestor.primitive
        return str(primitive.calling_ae_title) if primitive else ""

    @property
    def called_ae_title(self) -> str:
        primitive = self.assoc.requestor.primitive
        return str(primitive.called_ae_title) if primitive else ""

    @property
    def accepted(self) -> dict[int, str]:
        return {
            int(cx.context_id or 0): str(cx.transfer_syntax[0])
            for cx in self.assoc.accepted_contexts
        }

    @property
    def results(self) -> list[PresentationContext]:
        return [*self.assoc.accepted_contexts, *self.assoc.rejected_contexts]

    @property
    def user_identity(self) -> pdu.UserIdentity | None:
        item = self.assoc.requestor.user_identity
        if item is None or not item.user_identity_type:
            return None
        return pdu.UserIdentity(
            identity_type=int(item.user_identity_type),
            positive_response_requested=bool(item.positive_response_requested),
            primary=bytes(item.primary_field or b""),
            secondary=bytes(item.secondary_field or b""),
        )

    def abort(self) -> None:
        self.assoc.abort()


class PynetdicomSCP:
    """pynetdicom's AE on node.port (and the TLS port), feeding node.scp's handlers."""

    def __init__(self, config: Config, intake: Intake) -> None:
        self.handlers = StorageSCP(config, intake)  # its own listener is never started
        self.config = config
        self.negotiation = StorageNegotiation(config.accept.transfer_syntaxes)
        self._contexts: dict[str, PresentationContext] = {}
        self._views: dict[int, PeerAssociation] = {}
        self._lock = threading.Lock()
        self._servers: list[ThreadedAssociationServer] = []
        self.arriving = ArrivingFiles(config.spool_dir / RECEIVING_DIR)
        self.ae = AE(ae_title=config.node.ae_title)
        self.ae.add_supported_context(Verification)
        self.ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        self.ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        # Admission (node.admission) decides on AE titles and counts.
        self.ae.require_called_aet = False
        self.ae.require_calling_aet = []
        self.ae.maximum_associations = UNLIMITED
        self._apply_limits(config)

    def _apply_limits(self, config: Config) -> None:
        node = config.node
        self.arriving.max_size = config.limits.max_instance_size
        self.ae.maximum_pdu_size = node.max_pdu
        self.ae.acse_timeout = node.acse_timeout or None
        self.ae.dimse_timeout = node.dimse_timeout or None
        self.ae.network_timeout = node.network_timeout or None

    def start(self) -> None:
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Module-local, not tempfile.tempdir: nothing else in the process is affected.
        pynetdicom.dimse_messages.NamedTemporaryFile = self.arriving  # type: ignore[assignment]
        tls = self.config.security.tls
        context = server_context(tls) if tls.enabled else None
        if context is None or tls.plain_listener:
            self._serve(self.config.node.port, None)
        if context is not None:
            self._serve(tls.port, context)

    def _serve(self, port: int, context: Any) -> None:
        node = self.config.node
        server = self.ae.start_server(
            (node.host, port), block=False, ssl_context=context, evt_handlers=self._events()
        )
        assert server is not None  # block=False returns the running server
        self._servers.append(server)
        how = "with TLS" if context else "without TLS"
        log.info("listening on %s:%d as %r (pynetdicom), %s", node.host, port, node.ae_title, how)

    def _events(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
            (evt.EVT_C_STORE, self._on_store),
        ]

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop listening, let open associations finish for `drain_timeout` s, abort the rest."""
        for server in self._servers:
            server.shutdown()
        self._servers = []
        drain(self.active_associations, drain_timeout)

    def active_associations(self) -> list[PeerAssociation]:
        self._forget_ended()
        with self._lock:
            return list(self._views.values())

    def reconfigure(self, config: Config) -> None:
        """New associations get the new settings; open ones keep theirs."""
        self.config = config
        self.handlers.reconfigure(config)
        self.negotiation = StorageNegotiation(config.accept.transfer_syntaxes)
        self._contexts = {}
        self._apply_limits(config)

    # Event handlers, called from each association's thread.

    def _on_connection(self, event: evt.Event) -> None:
        event.assoc.dul._run_loop_delay = RUN_LOOP_DELAY

    def _on_requested(self, event: evt.Event) -> None:
        self._forget_ended()
        view = PeerAssociation(event.assoc)
        with self._lock:
            self._views[id(event.assoc)] = view
        refusal = self.handlers.admit(view)
        if refusal is not None:
            event.assoc.acse.send_reject(*refusal.result_source_diagnostic)
            self.handlers.rejected(view, refusal)
            event.assoc.kill()  # as pynetdicom's own rejections do: waits for the RJ to go out
            return
        if view.user_identity_response is not None:
            # With no EVT_USER_ID handler pynetdicom accepts the identity and adds no reply.
            reply = UserIdentityNegotiation()
            reply.server_response = view.user_identity_response
            event.assoc.acceptor.add_negotiation_item(reply)
        event.assoc.acceptor.supported_contexts = self._supported_for(event.assoc)

    def _supported_for(self, assoc: PynetdicomAssociation) -> list[PresentationContext]:
        """Our syntaxes, in our order, for each proposed abstract syntax we accept.

        pynetdicom picks the first of the acceptor's syntaxes that the requestor
        proposed, so this gives the native acceptor's choice.
        """
        request = assoc.requestor.primitive
        proposed = request.presentation_context_definition_list if request else []
        contexts: dict[str, PresentationContext] = {}
        for cx in proposed:
            abstract = str(cx.abstract_syntax)
            if abstract not in contexts:
                context = self._context_for(abstract)
                if context is not None:
                    contexts[abstract] = context
        return list(contexts.values())

    def _context_for(self, abstract_syntax: str) -> PresentationContext | None:
        known = self._contexts.get(abstract_syntax)
        if known is not None:
            return known
        syntaxes = self.negotiation.candidates_for(abstract_syntax)
        if not syntaxes or len(self._contexts) >= 10_000:  # a peer inventing UIDs: no more
            return None
        _serve_as_storage(abstract_syntax)
        known = self._contexts[abstract_syntax] = build_context(abstract_syntax, list(syntaxes))
        return known

    def _on_established(self, event: evt.Event) -> None:
        view = self._view(event.assoc)
        view.established = True
        self.handlers.established(view)

    def _on_aborted(self, event: evt.Event) -> None:
        self._view(event.assoc).aborted = True

    def _on_connection_closed(self, event: evt.Event) -> None:
        with self._lock:
            view = self._views.pop(id(event.assoc), None)
        if view is not None:
            self._finish(view)

    def _forget_ended(self) -> None:
        """Associations whose thread ended without a closed-connection event (a safety net)."""
        with self._lock:
            ended = [key for key, v in self._views.items() if not v.assoc.is_alive()]
            views = [self._views.pop(key) for key in ended]
        for view in views:
            self._finish(view)

    def _finish(self, view: PeerAssociation) -> None:
        self.handlers.admission.release(view)
        if view.established:
            view.established = False
            self.handlers.closed(view, view.aborted)

    def _view(self, assoc: PynetdicomAssociation) -> PeerAssociation:
        with self._lock:
            view = self._views.get(id(assoc))
            if view is None:
                view = self._views[id(assoc)] = PeerAssociation(assoc)
            return view

    def _on_store(self, event: evt.Event) -> Dataset:
        request = cast(C_STORE, event.request)
        arriving = getattr(request, "_dataset_file", None)
        command = dimse.Command(
            command_field=dimse.C_STORE_RQ,
            message_id=int(request.MessageID or 0),
            has_dataset=isinstance(arriving, ArrivingFile),
            affected_sop_class_uid=str(request.AffectedSOPClassUID or ""),
            affected_sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
        )
        context = event.context
        refusal = dimse.store_refusal(
            command,
            command.has_dataset,
            str(context.abstract_syntax),
            int(context.context_id or 0),
        )
        view = self._view(event.assoc)
        if refusal is not None:
            log.warning(
                "refused C-STORE-RQ from %s %r, SOP Instance UID %s with status 0x%04X: %s",
                view.address,
                view.calling_ae_title,
                command.affected_sop_instance_uid or "(none)",
                refusal.status,
                refusal.error_comment,
            )
            return _response(refusal)
        assert isinstance(arriving, ArrivingFile)
        status, comment = self.handlers.store(
            view, command, str(context.transfer_syntax), arriving.dataset
        )
        return _response(dimse.Answer(status, comment))


def _serve_as_storage(abstract_syntax: str) -> None:
    """Make pynetdicom serve a C-STORE of this SOP class with its Storage service.

    Without it, a retired, private or unknown storage SOP class (which we accept,
    as the native acceptor does) has no service class in pynetdicom, and its first
    C-STORE aborts the association (measured: the retired Ultrasound Image Storage
    1.2.840.10008.5.1.4.1.1.6 in pydicom-data).
    """
    if abstract_syntax == Verification:
        return
    if uid_to_service_class(abstract_syntax) is not StorageServiceClass:
        register_uid(
            abstract_syntax, f"NodeStorage_{abstract_syntax.replace('.', '_')}", StorageServiceClass
        )


def _response(answer: dimse.Answer) -> Dataset:
    response = Dataset()
    response.Status = answer.status
    if answer.error_comment and answer.status != Status.SUCCESS:
        response.ErrorComment = dimse.error_comment_value(answer.error_comment)
    if answer.offending_elements:
        response.OffendingElement = [Tag(0x0000, element) for element in answer.offending_elements]
    return response
