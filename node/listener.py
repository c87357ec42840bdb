"""The network front door: accept sockets cheaply, start pynetdicom only for peers that speak.

pynetdicom starts two polling threads for every accepted socket. A flood of
connections that never send anything would cost hundreds of threads and,
with TLS, pynetdicom's handshake in its single accept thread would let one
silent client block every other TLS peer. So an accepted socket first waits
in the Lobby, one thread and a selector for all of them, until its first
bytes arrive (then pynetdicom takes over) or the ACSE timeout passes (then it
is closed). The TLS handshake runs in the connection's own thread, bounded
by the ACSE timeout, and every socket gets the network timeout so a partial
PDU cannot block a reader forever.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any

from pynetdicom import evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from node.config import Config, TLSConfig
from node.pduguard import ReceiveLimits, watch
from node.tls import server_context

log = logging.getLogger("node.listener")

Address = tuple[str, int]


class Lobby:
    """Accepted sockets that have not sent a byte yet, watched by one thread."""

    def __init__(self, timeout: Callable[[], float | None], capacity: int | None = None) -> None:
        self.timeout = timeout
        self.capacity = capacity or default_capacity()
        self.dropped: Counter[str] = Counter()
        self._selector = selectors.DefaultSelector()
        self._arrivals: list[tuple[socket.socket, Callable[[], None]]] = []
        self._arrivals_lock = threading.Lock()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._waiting: dict[socket.socket, tuple[float, Callable[[], None]]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lobby", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        self._thread.join(5)
        for sock in list(self._waiting):
            self._close(sock)
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def waiting(self) -> int:
        return len(self._waiting)

    def admit(self, sock: socket.socket, on_ready: Callable[[], None]) -> None:
        """Hold `sock` until it is readable, then call on_ready (from the lobby thread)."""
        with self._arrivals_lock:
            self._arrivals.append((sock, on_ready))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # buffer full: the lobby is awake anyway
            self._wake_writer.send(b"\0")

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._take_arrivals()
            for key, _ in self._selector.select(timeout=self._next_wait()):
                if key.fileobj is self._wake_reader:
                    self._wake_reader.recv(4096)
                else:
                    self._hand_over(key.fileobj)  # type: ignore[arg-type]
            self._drop_expired()

    def _take_arrivals(self) -> None:
        with self._arrivals_lock:
            arrivals, self._arrivals = self._arrivals, []
        timeout = self.timeout()
        deadline = time.monotonic() + (timeout if timeout else 3600.0)
        for sock, on_ready in arrivals:
            if len(self._waiting) >= self.capacity:
                self._drop_oldest()
            try:
                self._selector.register(sock, selectors.EVENT_READ, None)
            except (OSError, ValueError):
                sock.close()
                continue
            self._waiting[sock] = (deadline, on_ready)

    def _next_wait(self) -> float:
        if not self._waiting:
            return 1.0
        soonest = min(deadline for deadline, _ in self._waiting.values())
        return max(0.0, min(1.0, soonest - time.monotonic()))

    def _hand_over(self, sock: socket.socket) -> None:
        _, on_ready = self._waiting.pop(sock)
        self._selector.unregister(sock)
        if _closed_by_peer(sock):
            # A port probe or health check: no association thread for it.
            sock.close()
            return
        try:
            on_ready()
        except Exception:
            log.exception("could not start an association thread; closing the connection")
            sock.close()

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for sock in [s for s, (deadline, _) in self._waiting.items() if deadline <= now]:
            self.dropped["silent"] += 1
            log.info("closed a connection from %s that sent nothing", _peer(sock))
            self._close(sock)

    def _drop_oldest(self) -> None:
        oldest = min(self._waiting, key=lambda s: self._waiting[s][0])
        self.dropped["lobby-full"] += 1
        log.warning(
            "%d silent connections waiting (the limit): closing the oldest, from %s",
            self.capacity,
            _peer(oldest),
        )
        self._close(oldest)

    def _close(self, sock: socket.socket) -> None:
        self._waiting.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        sock.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """True if the peer closed without sending a byte (readable, but at end of stream)."""
    try:
        # socket.socket.recv on purpose: an SSLSocket refuses flags, and before
        # the handshake the raw bytes are what we want to peek at.
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def default_capacity() -> int:
    """Room for silent sockets: half the file descriptors we may open, at most 4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(4096, soft // 2))


def raise_file_limit() -> None:
    """Use the hard RLIMIT_NOFILE (up to 65536): each peer costs a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard if hard != resource.RLIM_INFINITY else 65536, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "a closed socket"


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, with the receive limits watching the new association's reads."""

    server: GuardedAssociationServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        host, port = self.client_address[:2]
        watch(assoc.dul.socket, self.server.receive_limits, f"{host}:{port}")
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's server, with the lobby in front and the TLS handshake off the accept thread."""

    lobby: Lobby
    tls_failures: Counter[str]
    receive_limits: ReceiveLimits

    def process_request(self, request: Any, client_address: Any) -> None:
        start_thread = ThreadingMixIn.process_request
        self.lobby.admit(request, lambda: start_thread(self, request, client_address))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # Accepted sockets are blocking without a timeout; a partial PDU would
        # then block pynetdicom's reader (and its abort) forever.
        request.settimeout(self.ae.network_timeout)
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            return
        super().process_request_thread(request, client_address)

    def _handshake(self, request: ssl.SSLSocket, client_address: Any) -> bool:
        request.settimeout(self.ae.acse_timeout)
        try:
            request.do_handshake()
        except (OSError, ValueError) as exc:
            self.tls_failures[type(exc).__name__] += 1
            log.warning(
                "TLS handshake with %s:%s failed: %s", client_address[0], client_address[1], exc
            )
            request.close()
            return False
        request.settimeout(self.ae.network_timeout)
        return True


class SharedPortAssociationServer(GuardedAssociationServer):
    """A listener that shares its port with the other receiver processes (node.receivers > 1).

    SO_REUSEPORT must be set on every socket before bind(); the kernel then spreads
    new connections over the processes listening on the port.
    """

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _tls_summary(tls: TLSConfig) -> str:
    client = "client certificate required" if tls.require_client_cert else "no client certificate"
    return f"TLS {tls.min_version}+, {client}"


def end_wait_for_request(event: evt.Event) -> None:
    """The connection closed before an A-ASSOCIATE-RQ: let the association thread end now.

    pynetdicom would otherwise keep the thread waiting for the request until
    the ACSE timeout, and hold up a shutdown that long. A None on its queue
    is what it reads as "no request came".
    """
    assoc = event.assoc
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]


def start_guarded_server(
    ae: ApplicationEntity,
    address: Address,
    lobby: Lobby,
    receive_limits: ReceiveLimits,
    evt_handlers: list,
    ssl_context: ssl.SSLContext | None = None,
    share_port: bool = False,
) -> GuardedAssociationServer:
    """Like ae.start_server(block=False), with the guarded server class."""
    server = ae.make_server(
        address,
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
        server_class=SharedPortAssociationServer if share_port else GuardedAssociationServer,
        request_handler=GuardedRequestHandler,
    )
    server.lobby = lobby
    server.receive_limits = receive_limits
    server.tls_failures = Counter()
    thread = threading.Thread(
        target=server.serve_forever, name=f"AcceptorServer@{address[1]}", daemon=True
    )
    thread.start()
    ae._servers.append(server)  # pynetdicom's shutdown() removes it from this list
    return server


class Listeners:
    """The plain listener on node.port and, with [security.tls] enabled, the TLS one beside it."""

    def __init__(self, ae: ApplicationEntity, evt_handlers: list) -> None:
        self.ae = ae
        self.evt_handlers = [*evt_handlers, (evt.EVT_CONN_CLOSE, end_wait_for_request)]
        self.lobby = Lobby(timeout=lambda: ae.acse_timeout)
        self.receive_limits = ReceiveLimits()
        self.servers: list[GuardedAssociationServer] = []

    def reconfigure(self, config: Config) -> None:
        """Apply reloadable limits; new associations get them."""
        self.receive_limits.max_pdu = config.node.max_pdu
        self.receive_limits.max_instance_size = config.limits.max_instance_size

    def start(self, config: Config) -> None:
        self.reconfigure(config)
        tls = config.security.tls
        # Load the certificates first: a bad file stops the node before anything listens.
        context = server_context(tls) if tls.enabled else None
        raise_file_limit()
        self.lobby.start()
        if context is None or tls.plain_listener:
            self._listen(config, config.node.port, None)
        if context is not None:
            self._listen(config, tls.port, context)

    def _listen(self, config: Config, port: int, context: ssl.SSLContext | None) -> None:
        address = (config.node.host, port)
        self.servers.append(
            start_guarded_server(
                self.ae,
                address,
                self.lobby,
                self.receive_limits,
                self.evt_handlers,
                context,
                share_port=config.node.receivers > 1,
            )
        )
        how = _tls_summary(config.security.tls) if context else "without TLS"
        log.info("listening on %s:%d as %r, %s", *address, config.node.ae_title, how)

    def close(self) -> None:
        """Stop accepting; silent sockets are closed. Running associations are left alone."""
        for server in self.servers:
            server.shutdown()
        self.servers = []
        self.lobby.stop()
