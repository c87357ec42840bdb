"""The network front door: accept sockets cheaply, start an association only for peers that speak.

A flood of connections that never send anything must not cost a thread each,
and one silent TLS client must not hold up the others' handshakes. So an
accepted socket first waits in the Lobby, one thread and a selector for all
of them, until its first bytes arrive (then it gets its own association
thread, node.association) or the ACSE timeout passes (then it is closed).
The TLS handshake runs in the association's thread, bounded by the ACSE
timeout.
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

from node.config.model import Config, TLSConfig
from node.net.tls import server_context

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


# Starts an association's thread for a connection that has sent its first bytes.
StartAssociation = Callable[[socket.socket, Address, "ssl.SSLContext | None"], None]


class Listener:
    """One listening socket and the thread that accepts on it."""

    def __init__(
        self,
        address: Address,
        lobby: Lobby,
        start_association: StartAssociation,
        tls_context: ssl.SSLContext | None = None,
        share_port: bool = False,
    ) -> None:
        self.lobby = lobby
        self.start_association = start_association
        self.tls_context = tls_context
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share_port:
            # Set before bind() on every receiver's socket: the kernel then spreads
            # new connections over the processes listening on the port.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind(address)
        self.sock.listen(socket.SOMAXCONN)
        self.address: Address = self.sock.getsockname()[:2]
        self._closing = False
        self._thread = threading.Thread(
            target=self._accept_forever, name=f"accept@{self.address[1]}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.sock.close()
        self._thread.join(5)

    def _accept_forever(self) -> None:
        while not self._closing:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                if self._closing:
                    return
                time.sleep(0.05)  # EMFILE and the like: let the lobby free descriptors
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.lobby.admit(conn, self._starter(conn, peer[:2]))

    def _starter(self, conn: socket.socket, peer: Address) -> Callable[[], None]:
        return lambda: self.start_association(conn, peer, self.tls_context)


def _tls_summary(tls: TLSConfig) -> str:
    client = "client certificate required" if tls.require_client_cert else "no client certificate"
    return f"TLS {tls.min_version}+, {client}"


class Listeners:
    """The plain listener on node.port and, with [security.tls] enabled, the TLS one beside it."""

    def __init__(
        self, start_association: StartAssociation, acse_timeout: Callable[[], float | None]
    ) -> None:
        self.start_association = start_association
        self.lobby = Lobby(timeout=acse_timeout)
        self.listeners: list[Listener] = []

    def start(self, config: Config) -> None:
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
        listener = Listener(
            (config.node.host, port),
            self.lobby,
            self.start_association,
            context,
            share_port=config.node.receivers > 1,
        )
        listener.start()
        self.listeners.append(listener)
        how = _tls_summary(config.security.tls) if context else "without TLS"
        log.info("listening on %s:%d as %r, %s", config.node.host, port, config.node.ae_title, how)

    def close(self) -> None:
        """Stop accepting; silent sockets are closed. Running associations are left alone."""
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        self.lobby.stop()
