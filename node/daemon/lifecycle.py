"""The daemon's main loop: signals in, systemd notifications out.

The main thread does nothing but this loop, so its heartbeat is the node's:
WATCHDOG=1 is sent from here (with a database read for the STATUS= line on the
way), and a main loop stuck on a hung lock stops pinging and gets the node
restarted by systemd. Signals only write a byte to a wake-up socket
(signal.set_wakeup_fd); the loop reads it and acts, so nothing complicated ever
runs inside a signal handler.

SIGTERM/SIGINT: STOPPING=1, then Node.stop() (no new associations, open ones
get a bounded time to finish, jobs finish or are requeued, database closed).
SIGHUP: RELOADING=1, re-read the config file, apply it, READY=1. A config that
does not load is logged with its file and key and the running one is kept.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from node.config.model import Config, ConfigError, load_config
from node.daemon import metrics
from node.daemon.notify import Notifier, watchdog_interval
from node.jobs.model import JobState

if TYPE_CHECKING:
    from node.daemon.server import Node

log = logging.getLogger("node.lifecycle")

# How long associations in progress may take to finish at shutdown before they are aborted.
ASSOCIATION_DRAIN_TIMEOUT = 30.0

STATUS_INTERVAL = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalInbox:
    """Signals delivered as bytes on a socket, read by the main loop when it is ready."""

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        # A Python-level handler must exist for the wake-up byte to be written; it does nothing.
        self._previous = {signum: signal.signal(signum, _ignore) for signum in signals}

    def wait(self, timeout: float) -> list[signal.Signals]:
        """Signals received, waiting at most `timeout` seconds for the first one."""
        ready, _, _ = select.select([self._read], [], [], max(0.0, timeout))
        if not ready:
            return []
        try:
            data = self._read.recv(64)
        except BlockingIOError:
            return []
        return [signal.Signals(byte) for byte in data]

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._read.close()
        self._write.close()


def _ignore(signum: int, frame: object) -> None:
    pass


def restart_only_changes(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """Keep the settings a reload cannot change (sockets, folders, processes) as they run.

    Returns the config to apply and the keys whose new values wait for a restart.
    """
    node = replace(
        loaded.node,
        host=running.node.host,
        port=running.node.port,
        data_dir=running.node.data_dir,
        workers=running.node.workers,
        receivers=running.node.receivers,
        acceptor=running.node.acceptor,
    )
    security = replace(loaded.security, tls=running.security.tls)
    effective = replace(
        loaded, node=node, security=security, metrics=running.metrics, web=running.web
    )
    pending = [
        key
        for key, before, after in (
            ("node.host", running.node.host, loaded.node.host),
            ("node.port", running.node.port, loaded.node.port),
            ("node.data_dir", running.node.data_dir, loaded.node.data_dir),
            ("node.workers", running.node.workers, loaded.node.workers),
            ("node.receivers", running.node.receivers, loaded.node.receivers),
            ("node.acceptor", running.node.acceptor, loaded.node.acceptor),
            ("security.tls", running.security.tls, loaded.security.tls),
            ("metrics.address", running.metrics.address, loaded.metrics.address),
            ("web.address", running.web.address, loaded.web.address),
            ("web.token_file", running.web.token_file, loaded.web.token_file),
        )
        if before != after
    ]
    return effective, pending


def status_text(node: Node) -> str:
    """The one-line STATUS= shown by `systemctl status`."""
    received = metrics.total(metrics.INSTANCES_RECEIVED, status="success")
    refused = metrics.total(metrics.INSTANCES_RECEIVED) - received
    queued = failed = 0
    for row in node.reports.report():
        if row.state in (JobState.PENDING, JobState.RUNNING, JobState.WAITING):
            queued += row.count
        elif row.state == JobState.FAILED:
            failed += row.count
    return (
        f"{len(node.scp.active_associations())} associations open,"
        f" {received:.0f} instances received, {refused:.0f} refused,"
        f" {queued} jobs queued, {failed} failed"
    )


class DataDirBusy(OSError):
    pass


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on data_dir for the life of the process.

    Two nodes on one queue would requeue each other's running jobs at start.
    The lock is released by the kernel when the process ends, however it ends.
    """
    fd = os.open(data_dir / "node.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirBusy(
            errno.EBUSY, f"{data_dir} is in use by another dicom-node (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _startup_advice(exc: OSError) -> str:
    if isinstance(exc, DataDirBusy):
        return "stop the other node, or give this one its own node.data_dir"
    if exc.errno == errno.EADDRINUSE:
        return (
            "another process listens there, perhaps another dicom-node: stop it, or change"
            " node.port or metrics.address"
        )
    if exc.errno == errno.EACCES:
        return (
            "ports below 1024 need CAP_NET_BIND_SERVICE (see AmbientCapabilities in the"
            " systemd unit), or use a port from 1024 up"
        )
    return "check the addresses and folders in the config"


class Lifecycle:
    """Runs a Node from start to a clean stop, talking to systemd on the way."""

    def __init__(self, node: Node, notifier: Notifier | None = None) -> None:
        self.node = node
        self.notifier = notifier or Notifier()
        self.watchdog_every = watchdog_interval()
        self._last_status = ""
        self._lock: int | None = None

    def run(self) -> None:
        inbox = SignalInbox((*STOP_SIGNALS, signal.SIGHUP))
        try:
            self._start()
            self.node.phase = "ready"
            self.notifier.ready(self._refresh_status())
            log.info("ready (%s)", self._last_status)
            self._loop(inbox)
            self.node.phase = "draining"
            self.notifier.stopping()
            with self._watchdog_kept_alive():
                self.node.stop()
            log.info(
                "stopped after %.0f associations and %.0f instances received since start",
                metrics.total(metrics.ASSOCIATIONS_ACCEPTED),
                metrics.total(metrics.INSTANCES_RECEIVED, status="success"),
            )
        finally:
            inbox.close()
            self.notifier.close()

    def _start(self) -> None:
        """Start the node; a socket that cannot be opened ends the process with a clear line."""
        try:
            self._lock = lock_data_dir(self.node.config.node.data_dir)
        except OSError as exc:
            self._fail_to_start(exc)
        try:
            self.node.start()
        except OSError as exc:
            self.node.stop()  # the stages that did start
            self._fail_to_start(exc)

    def _fail_to_start(self, exc: OSError) -> None:
        log.error("cannot start: %s (%s)", exc, _startup_advice(exc))
        self.notifier.status(f"failed to start: {exc}")
        raise SystemExit(1) from None

    def _loop(self, inbox: SignalInbox) -> None:
        next_ping = next_status = time.monotonic()
        while True:
            now = time.monotonic()
            if self.watchdog_every and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + self.watchdog_every
            if now >= next_status:
                self._send_status_if_changed()
                next_status = now + STATUS_INTERVAL
            wake_at = min(next_status, next_ping) if self.watchdog_every else next_status
            for signum in inbox.wait(wake_at - time.monotonic()):
                log.info("received %s", signum.name)
                if signum in STOP_SIGNALS:
                    return
                self.reload()

    def reload(self) -> None:
        """Re-read the config file and apply it; a bad file changes nothing."""
        self.notifier.reloading()
        self.node.phase = "reloading"
        source = self.node.config.source
        try:
            loaded = load_config(source)
            config, pending = restart_only_changes(self.node.config, loaded)
            with self._watchdog_kept_alive():  # new forward workers wait for C-STOREs to end
                self.node.reload(config)
        except ConfigError as exc:
            log.error(
                "reload refused, still running the previous config: %s (fix the file, then"
                " `systemctl reload dicom-node` or send SIGHUP again)",
                exc,
            )
        except Exception:
            log.exception("reload of %s failed, still running the previous config", source)
        else:
            for key in pending:
                log.warning("reload: %s changed; it takes effect at the next restart", key)
            log.info("reloaded %s", source)
        self.node.phase = "ready"
        self.notifier.ready(self._refresh_status())

    def _refresh_status(self) -> str:
        self._last_status = status_text(self.node)
        return self._last_status

    def _send_status_if_changed(self) -> None:
        before = self._last_status
        if self._refresh_status() != before:
            self.notifier.status(self._last_status)

    @contextmanager
    def _watchdog_kept_alive(self) -> Iterator[None]:
        """Draining may outlast WatchdogSec; stopping is bounded by TimeoutStopSec instead."""
        if not self.watchdog_every:
            yield
            return
        done = threading.Event()
        interval = self.watchdog_every

        def ping() -> None:
            while not done.wait(interval):
                self.notifier.watchdog()

        thread = threading.Thread(target=ping, name="watchdog-while-stopping", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
