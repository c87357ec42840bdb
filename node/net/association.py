"""One association as the acceptor: negotiate, then serve C-ECHO, C-STORE, N-ACTION and N-EVENT-REPORT.

Each association runs in its own thread and blocks on its socket: a PDU is
handled the moment it arrives, with no polling loop between the network and
the handler (pynetdicom's reactors sleep a millisecond at a time, which the
profile showed as the largest cost of a small C-STORE). Messages are handled
one at a time, in order, as the DICOM default of one outstanding operation
requires. What the node does with a message (admission, intake, statistics)
belongs to the handlers; this module only speaks the protocol.

Another thread may send a request of ours on the association (`send_request`: a
Storage Commitment report to the modality that asked on it, PS3.4 J.3.3); its
response is routed back from the reading thread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from node.ingest.receiving import ArrivingDataset
from node.net import dimse, pdu, ul
from node.net.dimse import Answer, Command, CommandError
from node.net.pduguard import ReceiveLimitExceeded, ReceiveLimits
from node.net.ul import ConnectionClosed

log = logging.getLogger("node.association")

READ_BUFFER = 256 * 1024
# Longest wait for a requestor to close its connection after our reject (PS3.8 ARTIM).
ARTIM_TIMEOUT = 5.0
CHUNK = 1024 * 1024  # the most of one fragment read in a single call


@dataclass(frozen=True)
class AcceptorSettings:
    """What an association needs to know from the config; fixed for its lifetime."""

    max_pdu: int  # ours, advertised in the A-ASSOCIATE-AC; 0 is unlimited
    acse_timeout: float | None
    dimse_timeout: float | None  # for the rest of a message once its first fragment came
    network_timeout: float | None  # for an established association waiting for a message
    limits: ReceiveLimits
    receiving_folder: Path
    negotiate: Callable[[pdu.AssociateRequest], list[pdu.ContextResult]]
    implementation_class_uid: str
    implementation_version_name: str
    tls_context: ssl.SSLContext | None = None


@dataclass(frozen=True)
class Refusal:
    reason: str  # a short counter key
    result_source_diagnostic: tuple[int, int, int]
    message: str


class Handlers(Protocol):
    """What the node does at each step of an association."""

    def admit(self, assoc: Association) -> Refusal | None: ...
    def established(self, assoc: Association) -> None: ...
    def rejected(self, assoc: Association, refusal: Refusal) -> None: ...
    def closed(self, assoc: Association, aborted: bool) -> None: ...
    def echo(self, assoc: Association, command: Command) -> int: ...
    def store(
        self, assoc: Association, command: Command, transfer_syntax: str, dataset: ArrivingDataset
    ) -> tuple[int, str]: ...
    # N-ACTION-RQ and N-EVENT-REPORT-RQ (Storage Commitment), with their data set's bytes.
    def action(
        self, assoc: Association, command: Command, transfer_syntax: str, dataset: bytes
    ) -> Answer: ...
    def event_report(
        self, assoc: Association, command: Command, transfer_syntax: str, dataset: bytes
    ) -> Answer: ...


class RequestFailed(Exception):
    """A request of ours on the association got no response: it ended, or the wait timed out."""


@dataclass
class _Outstanding:
    """A request of ours waiting for its response."""

    message_id: int
    done: threading.Event = field(default_factory=threading.Event)
    response: Command | None = None


@dataclass
class Pending:
    """A request whose command has arrived and whose dataset may still be arriving."""

    context_id: int
    command: Command
    dataset: ArrivingDataset | None = None


@dataclass(eq=False)  # identity semantics: an association is a running thing, not a value
class Association:
    sock: socket.socket
    peer: tuple[str, int]
    settings: AcceptorSettings
    handlers: Handlers
    request: pdu.AssociateRequest | None = None
    accepted: dict[int, str] = field(default_factory=dict)  # context ID -> transfer syntax
    results: list[pdu.ContextResult] = field(default_factory=list)
    # Set by admit(): the Server-response of a positive User Identity reply, None for none.
    user_identity_response: bytes | None = None
    _send_lock: threading.Lock = field(default_factory=threading.Lock)
    _reader: BinaryIO | None = None
    _layer: ul.UpperLayer = field(init=False)
    _timeout: float | None = None  # the socket's, as last set: settimeout is a syscall
    _buffer: bytearray = field(default_factory=bytearray)  # reused by each arriving dataset
    _abstract_syntaxes: dict[int, str] = field(default_factory=dict)  # of accepted contexts
    _last_answered: Command | None = None  # what a late C-CANCEL-RQ may refer to
    _requesting: threading.Lock = field(default_factory=threading.Lock)  # one of ours at a time
    # Held from a request's handler to its response on the wire: a request of ours that a
    # handler caused (the report of an N-ACTION-RQ) goes after that response, never before.
    _answering: threading.Lock = field(default_factory=threading.Lock)
    _ending: threading.Lock = field(default_factory=threading.Lock)  # _ended and _outstanding
    _outstanding: _Outstanding | None = None
    _message_id: int = 0
    _ended: bool = False

    def __post_init__(self) -> None:
        self._layer = ul.UpperLayer(ul.Role.ACCEPTOR, self.settings.limits.pdu_limit)

    @property
    def calling_ae_title(self) -> str:
        return self.request.calling_ae_title if self.request else ""

    @property
    def called_ae_title(self) -> str:
        return self.request.called_ae_title if self.request else ""

    @property
    def user_identity(self) -> pdu.UserIdentity | None:
        return self.request.user_identity if self.request else None

    @property
    def address(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}"

    def run(self) -> None:
        """The association's thread: from the first byte to the closed socket."""
        try:
            if self.settings.tls_context is not None and not self._handshake():
                return
            self.request = self._read_request()
            if self.request is None:
                return
            # typeshed says IOBase for an int buffering; "rb" with buffering > 0 is a BufferedReader
            self._reader = cast(BinaryIO, self.sock.makefile("rb", buffering=READ_BUFFER))
            refusal = self.handlers.admit(self)
            if refusal is not None:
                self._send(self._layer.associate_rj(*refusal.result_source_diagnostic))
                self.handlers.rejected(self, refusal)
                self._await_transport_close()
                return
            self._accept()
            self._serve_established()
        except OSError as exc:  # the peer went away while we answered its request
            log.info("connection from %s ended during association set-up: %s", self.address, exc)
        finally:
            self._close()

    def abort(self) -> None:
        """Abort from another thread (a shutdown that ran out of time)."""
        with contextlib.suppress(OSError):
            self._send(self._layer.abort())
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _handshake(self) -> bool:
        context = self.settings.tls_context
        assert context is not None
        self._set_timeout(self.settings.acse_timeout)
        try:
            self.sock = context.wrap_socket(
                self.sock, server_side=True, do_handshake_on_connect=False
            )
            self.sock.do_handshake()  # type: ignore[attr-defined]
        except (OSError, ValueError) as exc:
            log.warning("TLS handshake with %s failed: %s", self.address, exc)
            return False
        return True

    def _read_request(self) -> pdu.AssociateRequest | None:
        # One deadline for the whole request: a peer trickling a byte at a time must not
        # hold this thread for longer than acse_timeout.
        timeout = self.settings.acse_timeout
        deadline = time.monotonic() + timeout if timeout else None
        try:
            event = ul.receive_event(
                self._layer, lambda wanted: self._receive_before(wanted, deadline)
            )
            assert isinstance(event, ul.AssociateRequested)  # the only PDU the codec lets by
            return event.request
        except (ConnectionClosed, OSError) as exc:
            log.info(
                "connection from %s ended before an association request: %s", self.address, exc
            )
        except (pdu.PDUError, ReceiveLimitExceeded) as exc:
            log.warning("refused a connection from %s: %s", self.address, exc)
            self._send_abort_quietly(getattr(exc, "reason", pdu.REASON_NOT_SPECIFIED))
        return None

    def _accept(self) -> None:
        assert self.request is not None
        self.results = self.settings.negotiate(self.request)
        self.accepted = {r.context_id: r.transfer_syntax for r in self.results if r.result == 0}
        self._send(
            self._layer.associate_ac(
                self.request,
                self.results,
                self.settings.max_pdu,
                (self.settings.implementation_class_uid, self.settings.implementation_version_name),
                self.user_identity_response,
            )
        )
        self._set_timeout(self.settings.network_timeout)
        self.handlers.established(self)

    def _serve_established(self) -> None:
        aborted = True
        try:
            aborted = not self._serve_messages()
        except TimeoutError:
            log.warning(
                "aborting the association from %s %r: no PDU for %s s",
                self.address,
                self.calling_ae_title,
                self.sock.gettimeout(),
            )
            self._send_abort_quietly(pdu.REASON_NOT_SPECIFIED)
        except ConnectionClosed as exc:
            # Hanging up between PDUs, without A-RELEASE, loses nothing we acknowledged; a
            # connection cut inside a PDU means a sender lost its link while sending.
            level = logging.INFO if exc.between_pdus else logging.WARNING
            log.log(
                level, "association from %s %r ended: %s", self.address, self.calling_ae_title, exc
            )
        except OSError as exc:
            log.warning(
                "association from %s %r ended: %s", self.address, self.calling_ae_title, exc
            )
        except (pdu.PDUError, CommandError, ReceiveLimitExceeded) as exc:
            log.warning(
                "aborting the association from %s %r: %s", self.address, self.calling_ae_title, exc
            )
            self._send_abort_quietly(getattr(exc, "reason", pdu.REASON_NOT_SPECIFIED))
        except Exception:
            # A bug of ours: the peer gets an A-ABORT (its unacknowledged instance is retried
            # by the sender), the traceback goes to the log, and the daemon serves on.
            log.exception(
                "aborting the association from %s %r after an internal error",
                self.address,
                self.calling_ae_title,
            )
            self._send_abort_quietly(pdu.REASON_NOT_SPECIFIED)
        finally:
            self._end_requests()
            self.handlers.closed(self, aborted)

    def _serve_messages(self) -> bool:
        """Handle events until the association ends: True if released, False if aborted."""
        pending: Pending | None = None
        self._abstract_syntaxes = self._accepted_abstract_syntaxes()
        try:
            while True:
                event = self._next_event(pending)
                if isinstance(event, ul.DatasetFragment):
                    assert pending is not None and pending.dataset is not None  # the codec's rule
                    pending = self._dataset_fragment(event, pending, pending.dataset)
                elif isinstance(event, ul.CommandReceived):
                    pending = self._command(event, pending)
                elif isinstance(event, ul.ReleaseRequested):
                    self._send(self._layer.release_rp())
                    return True
                else:  # ul.Aborted: the only other PDU the codec lets by here
                    log.info(
                        "association from %s %r aborted by the peer",
                        self.address,
                        self.calling_ae_title,
                    )
                    return False
        finally:
            if pending is not None and pending.dataset is not None:
                pending.dataset.discard()

    def _next_event(self, pending: Pending | None) -> ul.Event:
        """Read until the codec has an event. Data set bytes go from the socket straight into
        the arriving dataset's reused buffer, CHUNK at most at a time, never through the codec."""
        layer = self._layer
        assert self._reader is not None
        read = self._reader.read
        dataset = pending.dataset if pending is not None else None
        while True:
            event = layer.next_event()
            if not isinstance(event, ul.NeedData):
                return event
            self._set_timeout(
                self.settings.dimse_timeout if layer.in_message else self.settings.network_timeout
            )
            if dataset is not None and (due := layer.payload_due()):
                return self._receive_payload(dataset, min(due, CHUNK))
            layer.receive_data(read(layer.bytes_wanted()))

    def _receive_payload(self, dataset: ArrivingDataset, chunk: int) -> ul.DatasetFragment:
        self._check_dataset_size(dataset.size + chunk)
        assert self._reader is not None
        view = dataset.region(chunk)
        received = 0
        while received < chunk:
            count = self._reader.readinto(view[received:])  # type: ignore[attr-defined]
            if not count:
                if received:
                    self._layer.payload_received(received)
                raise self._layer.connection_lost()
            received += count
        dataset.filled(chunk)
        return self._layer.payload_received(chunk)

    def _accepted_abstract_syntaxes(self) -> dict[int, str]:
        contexts = self.request.contexts if self.request else []
        return {
            int(context.context_id): str(context.abstract_syntax)
            for context in contexts
            if context.context_id in self.accepted
        }

    def _command(self, event: ul.CommandReceived, pending: Pending | None) -> Pending | None:
        command = dimse.decode_command(event.command_set)
        if event.amid_dataset:
            assert pending is not None
            return self._command_amid_dataset(command, pending)
        if command.is_response and not command.has_dataset:
            self._response_arrived(command)
            return None
        if command.has_dataset:
            self._layer.expect_dataset(event.context_id)
            arriving = ArrivingDataset(self.settings.receiving_folder, self._buffer)
            return Pending(event.context_id, command, arriving)
        self._respond(Pending(event.context_id, command))
        return None

    def _command_amid_dataset(self, command: Command, pending: Pending) -> Pending:
        """A command while a request's data set is arriving: only a C-CANCEL-RQ may come.

        An SCU may send C-CANCEL-RQ while its request is in progress (PS3.7 9.3.2.3). A
        C-STORE cannot be cancelled, so it is noted and its data set goes on arriving.
        """
        if command.is_response and not command.has_dataset:
            self._response_arrived(command)  # to a request of ours, sent while this one came
            return pending
        if command.command_field != dimse.C_CANCEL_RQ or command.has_dataset:
            raise pdu.PDUError(f"a {command.name} began before the last one's dataset ended")
        self._note_cancel(command, in_progress=pending.command)
        return pending

    def _dataset_fragment(
        self, event: ul.DatasetFragment, pending: Pending, dataset: ArrivingDataset
    ) -> Pending | None:
        if event.data:  # fed through the codec (_next_event reads payload itself instead)
            self._receive_held(dataset, event.data)
        if not event.last:
            return pending
        try:
            self._respond(pending)
        finally:
            dataset.discard()
            self._buffer = dataset.buffer
        return None

    def _receive_held(self, dataset: ArrivingDataset, data: bytes) -> None:
        self._check_dataset_size(dataset.size + len(data))
        dataset.region(len(data))[:] = data
        dataset.filled(len(data))

    def _check_dataset_size(self, size: int) -> None:
        limit = self.settings.limits.message_limit()
        if limit and size > limit:
            raise ReceiveLimitExceeded(
                f"a dataset passed {size} bytes (twice limits.max_instance_size: {limit})"
            )

    def _respond(self, pending: Pending) -> None:
        command = pending.command
        if command.command_field == dimse.C_CANCEL_RQ:
            self._note_cancel(command)  # PS3.7 9.3.2.3: a C-CANCEL-RQ has no response
            return
        if command.is_response:  # with a data set (an Event Reply): kept for nobody
            self._response_arrived(command)
            return
        with self._answering:
            answer = self._answer(pending)
            response = dimse.encode_response(
                command, answer.status, answer.error_comment, answer.offending_elements
            )
            self._send(pdu.encode_command_pdu(pending.context_id, response))
        self._last_answered = command

    def _answer(self, pending: Pending) -> Answer:
        command = pending.command
        if command.command_field == dimse.C_STORE_RQ:
            return self._answer_store(pending)
        if command.command_field == dimse.C_ECHO_RQ:
            return Answer(self.handlers.echo(self, command))
        if command.command_field in (
            dimse.N_ACTION_RQ,
            dimse.N_EVENT_REPORT_RQ,
        ) and command.sop_class_uid == self._abstract_syntaxes.get(pending.context_id):
            return self._answer_normalized(pending)
        log.warning(
            "%s from %s %r is not a service the node provides: answered 0x%04X",
            command.name,
            self.address,
            self.calling_ae_title,
            dimse.UNRECOGNIZED_OPERATION,
        )
        return Answer(dimse.UNRECOGNIZED_OPERATION)

    def _answer_store(self, pending: Pending) -> Answer:
        command = pending.command
        syntax = self.accepted[pending.context_id]
        refusal = dimse.store_refusal(
            command,
            pending.dataset is not None,
            self._abstract_syntaxes.get(pending.context_id),
            pending.context_id,
        )
        if refusal is not None:
            log.warning(
                "refused C-STORE-RQ from %s %r, SOP Instance UID %s (transfer syntax %s)"
                " with status 0x%04X: %s",
                self.address,
                self.calling_ae_title,
                command.affected_sop_instance_uid or "(none)",
                syntax,
                refusal.status,
                refusal.error_comment,
            )
            return refusal
        assert pending.dataset is not None
        status, comment = self.handlers.store(self, command, syntax, pending.dataset)
        return Answer(status, comment)

    def _answer_normalized(self, pending: Pending) -> Answer:
        """N-ACTION-RQ or N-EVENT-REPORT-RQ on a context of its own SOP Class (Storage
        Commitment): the handlers answer it with the data set's bytes."""
        command = pending.command
        syntax = self.accepted[pending.context_id]
        data = b""
        if pending.dataset is not None:
            with pending.dataset.contents() as (received, _on_disk):
                data = bytes(received)
        handle = (
            self.handlers.action
            if command.command_field == dimse.N_ACTION_RQ
            else self.handlers.event_report
        )
        return handle(self, command, syntax, data)

    # Requests of ours, sent from another thread while this one reads.

    def context_for(self, abstract_syntax: str) -> tuple[int, str] | None:
        """An accepted presentation context for this SOP Class: (context ID, transfer syntax)."""
        for context_id, syntax in self._accepted_abstract_syntaxes().items():
            if syntax == abstract_syntax and context_id in self.accepted:
                return context_id, self.accepted[context_id]
        return None

    def send_request(
        self,
        context_id: int,
        command_for: Callable[[int], bytes],
        dataset: bytes,
        timeout: float,
    ) -> Command:
        """Send a request (its command set made by command_for(message ID), then its data set)
        and wait for the response; raises RequestFailed. One request of ours at a time."""
        with self._requesting:
            self._message_id = self._message_id % 0xFFFF + 1
            outstanding = _Outstanding(self._message_id)
            with self._ending:  # else an end between the check and this would go unseen
                if self._ended:
                    raise RequestFailed(f"the association from {self.address} has ended")
                self._outstanding = outstanding
            try:
                peer_max = self.request.max_pdu if self.request else 0
                pdus = [
                    pdu.encode_command_pdu(context_id, command_for(outstanding.message_id)),
                    *pdu.encode_dataset_pdus(context_id, dataset, peer_max),
                ]
                with self._answering, self._send_lock:
                    for data in pdus:
                        self.sock.sendall(data)
                if not outstanding.done.wait(timeout):
                    raise RequestFailed(f"no response from {self.address} within {timeout:g} s")
                if outstanding.response is None:
                    raise RequestFailed(f"the association from {self.address} ended")
                return outstanding.response
            except OSError as exc:
                raise RequestFailed(f"cannot send to {self.address}: {exc}") from None
            finally:
                self._outstanding = None

    def _response_arrived(self, command: Command) -> None:
        outstanding = self._outstanding
        if outstanding is None or command.message_id_being_responded_to != (outstanding.message_id):
            log.warning(
                "%s from %s %r answers Message ID %s, which we did not send: ignored",
                command.name,
                self.address,
                self.calling_ae_title,
                command.message_id_being_responded_to,
            )
            return
        outstanding.response = command
        outstanding.done.set()

    def _end_requests(self) -> None:
        with self._ending:
            self._ended = True
            outstanding = self._outstanding
        if outstanding is not None:
            outstanding.done.set()  # with no response: the association ended

    def _note_cancel(self, command: Command, in_progress: Command | None = None) -> None:
        responded_to = command.message_id_being_responded_to
        last = self._last_answered
        if in_progress is not None and in_progress.message_id == responded_to:
            why = f"a {in_progress.name} cannot be cancelled, it goes on"
        elif last is not None and last.message_id == responded_to:
            why = f"its {last.name} was already answered"
        else:
            why = "no request with that Message ID is in progress"
        log.info(
            "C-CANCEL-RQ from %s %r for Message ID %s ignored: %s",
            self.address,
            self.calling_ae_title,
            responded_to,
            why,
        )

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def _receive_before(self, size: int, deadline: float | None) -> bytes:
        """At most `size` bytes straight from the socket, before `deadline`."""
        late = f"no complete association request in {self.settings.acse_timeout} s"
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(late)
            self._set_timeout(remaining)
        try:
            return self.sock.recv(size)
        except TimeoutError:  # the deadline passed during the wait
            raise TimeoutError(late) from None

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def _await_transport_close(self) -> None:
        """After an A-ASSOCIATE-RJ the requestor closes the connection (PS3.8 9.2, Sta13).

        Closing first can reset the connection before the requestor has read the
        reject, and it then reports an abort where we refused (pynetdicom did, under
        load). So wait for its close, bounded like the ARTIM timer, reading and
        discarding whatever it still sends.
        """
        deadline = time.monotonic() + ARTIM_TIMEOUT
        with contextlib.suppress(OSError):
            while (remaining := deadline - time.monotonic()) > 0:
                self.sock.settimeout(remaining)
                if not self.sock.recv(4096):
                    return

    def _send_abort_quietly(self, reason: int) -> None:
        with contextlib.suppress(OSError):
            self._send(self._layer.abort(pdu.SERVICE_PROVIDER, reason))

    def _close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(OSError):
                self._reader.close()
        with contextlib.suppress(OSError):
            self.sock.close()
