"""Extra receiver processes: more interpreters accepting associations on node.port.

One interpreter's GIL bounds ingest: the acceptor's association threads (node.net.association)
share it, so four parallel associations in one process are no faster than one. With
`node.receivers = N` the main process starts N-1 receiver processes (spawned,
never forked from our threaded process). Each binds node.port (and the TLS port)
with SO_REUSEPORT, so the kernel spreads new connections over them, and runs its
own listener and intake: the spool write and JobQueue.record_instance into the same SQLite
WAL database, Success only after that commit, as in the main process.

Store workers, forwarders, the transcode pool, metrics and systemd notifications
stay in the main process. A receiver tells the main process's workers about a new
instance with one datagram on a socket they share (the workers would otherwise
find it at their next poll). The main process restarts a receiver that dies, passes
SIGHUP on (each receiver re-reads the config file) and, on SIGTERM, stops them while
it drains its own associations. max_associations applies per process, and the
association and instance counters in metrics cover the main process only.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from node.config.model import Config, ConfigError, load_config
from node.daemon.lifecycle import (
    ASSOCIATION_DRAIN_TIMEOUT,
    STOP_SIGNALS,
    SignalInbox,
    restart_only_changes,
)
from node.daemon.logs import set_level, setup_logging
from node.daemon.queues import queue_settings
from node.ingest.intake import Intake, free_space_probe
from node.ingest.route import Router
from node.ingest.scp import RECEIVING_DIR, StorageSCP
from node.ingest.spool import Spool
from node.jobs.backends import open_job_queue
from node.store.kinds import local_root, storage_targets
from node.store.targets import duplicate_checker, header_recorder

log = logging.getLogger("node.receivers")

# Spawning imports pydicom and pynetdicom anew: allow for a slow, loaded machine.
START_TIMEOUT = 60.0
# A receiver that dies at once (a port taken by someone else) is not restarted in a tight loop.
RESTART_INTERVAL = 2.0
# How often a receiver checks that the main process still exists.
PARENT_CHECK_INTERVAL = 1.0
WAKE = b"w"
STOP = b"s"


class PidFilter(logging.Filter):
    """Tag every log line with the process id: with receivers > 1 several processes share a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.name = f"{record.name}[{os.getpid()}]"
        return True


def tag_log_lines() -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, PidFilter) for f in handler.filters):
            handler.addFilter(PidFilter())


class WakeChannel:
    """Datagrams from receivers (one per recorded instance) that wake the main process's workers."""

    def __init__(self, on_wake: Callable[[], None]) -> None:
        self.on_wake = on_wake
        self._reader, self.sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        # A full buffer means the workers have wake-ups waiting anyway: never block intake.
        self.sender.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="receiver-wakeups", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while self._reader.recv(16) != STOP:
            self.on_wake()

    def close(self) -> None:
        if self._thread.is_alive():
            self._reader.settimeout(5.0)
            with contextlib.suppress(OSError):
                self.sender.setblocking(True)
                self.sender.send(STOP)
            self._thread.join(5.0)
        self._reader.close()
        self.sender.close()


def wake_sender(sender: socket.socket) -> Callable[[], None]:
    def wake() -> None:
        with contextlib.suppress(OSError):  # buffer full: the main process is awake already
            sender.send(WAKE)

    return wake


@dataclass
class _Child:
    index: int
    process: BaseProcess
    started_at: float


class ReceiverProcesses:
    """The main process's side: start, watch, restart, reload and stop the receivers."""

    def __init__(self, config: Config, on_wake: Callable[[], None]) -> None:
        self.config = config
        self._context = multiprocessing.get_context("spawn")
        self._wakeups = WakeChannel(on_wake)
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="receiver-monitor", daemon=True)

    def start(self) -> None:
        """Start every receiver and wait until each listens; one that cannot raises OSError."""
        tag_log_lines()
        self._wakeups.start()
        count = self.config.node.receivers - 1
        started = [self._spawn(index) for index in range(1, count + 1)]
        with self._lock:  # all of them, so that stopping after a failure ends every one
            self._children.extend(child for child, _ in started)
        for child, ready in started:
            if not _await_ready(child, ready):
                raise OSError(f"receiver process {child.index} did not start (see its log lines)")
        self._monitor.start()
        log.info("%d receiver processes share port %d with this one", count, self.config.node.port)

    def _spawn(self, index: int) -> tuple[_Child, Connection]:
        ready, ready_writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=run_receiver,
            args=(self.config, index, self._wakeups.sender, ready_writer),
            name=f"receiver-{index}",
            daemon=True,  # multiprocessing ends it, should the main process exit unexpectedly
        )
        process.start()
        ready_writer.close()
        return _Child(index, process, time.monotonic()), ready

    def _watch(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                sentinels = {c.process.sentinel: c for c in self._children}
            for sentinel in wait(list(sentinels), timeout=1.0):
                if not self._stopping.is_set():
                    self._restart(sentinels[sentinel])  # type: ignore[index]

    def _restart(self, dead: _Child) -> None:
        log.warning(
            "receiver process %d (pid %s) exited with code %s; starting a new one",
            dead.index,
            dead.process.pid,
            dead.process.exitcode,
        )
        dead.process.join()
        self._stopping.wait(max(0.0, dead.started_at + RESTART_INTERVAL - time.monotonic()))
        if self._stopping.is_set():
            return
        child, ready = self._spawn(dead.index)
        with self._lock:
            self._children[self._children.index(dead)] = child
        if _await_ready(child, ready):
            log.info("receiver process %d restarted as pid %s", child.index, child.process.pid)

    def reload(self, config: Config) -> None:
        """Each receiver re-reads the config file; restarted ones get `config`."""
        self.config = config
        self._signal_all(signal.SIGHUP)

    def stop_accepting(self) -> None:
        """SIGTERM every receiver: it closes its listener and drains its associations."""
        self._stopping.set()
        self._signal_all(signal.SIGTERM)
        if self._monitor.is_alive():
            self._monitor.join()
            # Again, for a receiver the monitor was restarting just then; SIGTERM twice is harmless.
            self._signal_all(signal.SIGTERM)

    def join(self, drain_timeout: float) -> None:
        """Wait for the receivers to finish draining (their bound plus slack), then end the rest."""
        deadline = time.monotonic() + drain_timeout + 15.0
        with self._lock:
            children = list(self._children)
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.warning("receiver process %d did not stop; killing it", child.index)
                child.process.kill()
                child.process.join(5.0)
        self._wakeups.close()

    def _signal_all(self, signum: signal.Signals) -> None:
        with self._lock:
            pids = [c.process.pid for c in self._children if c.process.is_alive()]
        for pid in pids:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)


def _await_ready(child: _Child, ready: Connection) -> bool:
    """True once the receiver listens; False if it died first or took too long."""
    try:
        if ready.poll(START_TIMEOUT):
            ready.recv()
            return True
        log.error("receiver process %d did not start within %.0f s", child.index, START_TIMEOUT)
    except EOFError:
        log.error(
            "receiver process %d (pid %s) ended before listening", child.index, child.process.pid
        )
    finally:
        ready.close()
    return False


# ---- inside a receiver process ----


class Receiver:
    """One receiver process's stages: queue connection, spool, intake and SCP."""

    def __init__(self, config: Config, index: int, on_recorded: Callable[[], None]) -> None:
        self.config = config
        self.queue = open_job_queue(queue_settings(config), claims=False)
        self.targets = storage_targets(config.storage, config.node.data_dir)
        router = Router(config)
        self.intake = Intake(
            spool=Spool(config.spool_dir),
            queue=self.queue,
            plan_jobs=router.plan,
            find_duplicate=duplicate_checker(self.queue, self.targets),
            header_values=header_recorder(self.targets),
            has_headroom=free_space_probe(_watched_folders(config), config.limits.min_free_space),
            max_instance_size=config.limits.max_instance_size,
            on_recorded=on_recorded,
        )
        # Its own folder for arriving datasets: starting up empties it of a crashed run's files.
        self.scp = StorageSCP(config, self.intake, receiving_dir=f"{RECEIVING_DIR}-{index}")

    def reload(self) -> None:
        """Re-read the config file; a bad one keeps the running settings (the main process says why)."""
        try:
            config, _ = restart_only_changes(self.config, load_config(self.config.source))
        except ConfigError:
            return
        targets = storage_targets(config.storage, config.node.data_dir)
        self.targets.clear()  # shared with the duplicate checker: updated in place
        self.targets.update(targets)
        self.intake.plan_jobs = Router(config).plan
        self.intake.has_headroom = free_space_probe(
            _watched_folders(config), config.limits.min_free_space
        )
        self.intake.max_instance_size = config.limits.max_instance_size
        self.scp.reconfigure(config)
        set_level(config.node.log_level)
        self.config = config
        log.info("reloaded %s", config.source)


def _watched_folders(config: Config) -> list[Path]:
    return [config.spool_dir, *(local_root(s, config.node.data_dir) for s in config.storage)]


def run_receiver(config: Config, index: int, wake: socket.socket, ready: Connection) -> None:
    """A receiver process's main: listen, say ready, then wait for signals."""
    setup_logging(config.node.log_level)
    tag_log_lines()
    inbox = SignalInbox((*STOP_SIGNALS, signal.SIGHUP))
    parent = os.getppid()
    receiver = Receiver(config, index, wake_sender(wake))
    try:
        receiver.scp.start()
    except OSError as exc:
        log.error("receiver process %d cannot listen: %s", index, exc)
        raise SystemExit(1) from None
    ready.send(os.getpid())
    ready.close()
    _serve_until_stopped(receiver, inbox, parent)
    log.info("receiver process %d stopping: no new associations, finishing open ones", index)
    receiver.scp.stop(ASSOCIATION_DRAIN_TIMEOUT)
    receiver.queue.close()


def _serve_until_stopped(receiver: Receiver, inbox: SignalInbox, parent: int) -> None:
    while True:
        for signum in inbox.wait(PARENT_CHECK_INTERVAL):
            if signum in STOP_SIGNALS:
                return
            receiver.reload()
        if os.getppid() != parent:
            log.warning("the main process is gone: this receiver stops too")
            return
