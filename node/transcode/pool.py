"""Crash isolation: every decode and encode runs in a worker process.

A C codec that segfaults or aborts kills only its worker (python-gdcm's RLE encoder aborts
the interpreter on SC_rgb_small_odd.dcm; pylibjpeg-openjpeg's encoder segfaults when two
threads encode at once). The rung in
progress counts as failed, the worker is replaced, and the ladder goes on; the final
as-received copy is made in the parent without decoding anything.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Any

from node.daemon.logs import setup_logging
from node.shape import ShapeContext, Shaping
from node.transcode.codecs import codec_for, current_overrides, install_overrides
from node.transcode.ladder import Outcome, walk_ladder
from node.transcode.rung import RungResult, try_rung
from node.transcode.targets import Target

DEFAULT_TASK_TIMEOUT = 600.0
_PRELOAD = ["node.transcode.rung", "node.transcode.codecs"]


class WorkerDied(Exception):
    """The worker process ended while running a rung; the message says how."""


class _Worker:
    """One worker process and the pipe to it. Used by one thread at a time."""

    def __init__(self, context: ForkServerContext) -> None:
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_end,), daemon=True)
        self.process.start()
        child_end.close()

    def run(self, task: tuple[Any, ...], timeout: float) -> RungResult:
        try:
            self.conn.send(task)
            if not self.conn.poll(timeout):
                self.process.kill()
                raise WorkerDied(f"codec timed out after {timeout:g} s")
            reply = self.conn.recv()
        except (EOFError, ConnectionError, BrokenPipeError):
            raise WorkerDied(self._death()) from None
        if isinstance(reply, BaseException):
            raise reply  # I/O errors from the worker belong to the caller
        return reply

    def _death(self) -> str:
        self.process.join(5)
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"codec process died ({signal.Signals(-code).name})"
        return f"codec process died (exit code {code})"

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _serve(conn: Connection) -> None:
    """Worker loop: one rung per message, a RungResult (or an OSError) per reply."""
    setup_logging("WARNING")  # pydicom's warnings from codec work reach journald prefixed too
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        src, dst, target, allow_lossy, overrides, shaping, context = task
        install_overrides(overrides)
        try:
            reply: RungResult | OSError = try_rung(src, dst, target, allow_lossy, shaping, context)
        except OSError as error:
            reply = error
        conn.send(reply)


class TranscodePool:
    """Thread-safe, blocking transcoding with codecs in worker processes."""

    def __init__(self, workers: int | None = None, *, task_timeout: float = DEFAULT_TASK_TIMEOUT):
        self.size = max(1, workers or os.cpu_count() or 1)
        self._timeout = task_timeout
        # forkserver: the parent runs threads (associations, forwarders, store workers), and
        # fork() with threads is unsafe.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(_PRELOAD)
        self._idle: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
        for _ in range(self.size):
            self._idle.put(None)  # started lazily on first use
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False

    def transcode(
        self,
        src: Path,
        dst: Path,
        ladder: Sequence[Target],
        *,
        allow_lossy: bool = False,
        shaping: Shaping | None = None,
        context: ShapeContext | None = None,
    ) -> Outcome:
        """Walk the ladder in worker processes; with a shaping, every rung (the header-only
        one too) changes the header in the worker, and ShapingFailed says when it cannot."""
        src, dst = Path(src), Path(dst)
        shape_context = context or ShapeContext()

        def attempt(target: Target | None) -> RungResult:
            return self._attempt(src, dst, target, allow_lossy, shaping, shape_context)

        return walk_ladder(src, dst, ladder, attempt, shaped=shaping is not None)

    def _attempt(
        self,
        src: Path,
        dst: Path,
        target: Target | None,
        allow_lossy: bool,
        shaping: Shaping | None,
        context: ShapeContext,
    ) -> RungResult:
        task = (src, dst, target, allow_lossy, current_overrides(), shaping, context)
        worker: _Worker | None  # None once it died: its slot then starts a new one lazily
        worker = self._take()
        try:
            return worker.run(task, self._timeout)
        except WorkerDied as death:
            self._forget(worker)
            worker = None
            return RungResult(target, ok=False, reason=f"{death} in {_library(target)}")
        finally:
            self._idle.put(worker)

    def _take(self) -> _Worker:
        if self._closed:
            raise RuntimeError("TranscodePool is closed")
        worker = self._idle.get()
        if worker is None:
            try:
                worker = _Worker(self._context)
            except BaseException:
                self._idle.put(None)
                raise
            with self._lock:
                self._all.add(worker)
        return worker

    def _forget(self, worker: _Worker) -> None:
        with self._lock:
            self._all.discard(worker)
        worker.stop()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.stop()

    def __enter__(self) -> TranscodePool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _library(target: Target | None) -> str:
    if target is None:
        return "pydicom (header only)"
    codec = codec_for(target.transfer_syntax)
    return codec.library if codec else "native encoder"
