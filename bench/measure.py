"""Sending with DCMTK storescu, timing until acknowledged and until stored, sampling resources."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.receivers import NODELAY_ENV, tool

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    """One timed transfer."""

    instances: int
    bytes: int
    ack_seconds: float  # until the last storescu exited
    stored_seconds: float | None  # until the receiver had placed every file (None: never)
    failure: str = ""  # "aborted", "stalled", ... when the transfer did not complete
    peak_rss: int = 0  # bytes, whole process tree of the receiver
    cpu_seconds: float = 0.0  # receiver process tree, user + system, until all was stored

    @property
    def cpu_ms_per_instance(self) -> float:
        return 1000 * self.cpu_seconds / self.instances if self.instances else 0.0


def send(
    port: int, ae_title: str, files: Sequence[Path], associations: int
) -> list[subprocess.Popen]:
    """Start `associations` storescu processes, each sending its share of the files."""
    storescu = tool("storescu", "/usr/bin/storescu")
    shares = [list(files[i::associations]) for i in range(associations)]
    return [
        subprocess.Popen(
            [storescu, "-aec", ae_title, "-aet", "BENCH", "127.0.0.1", str(port), *map(str, share)],
            env=NODELAY_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for share in shares
        if share
    ]


def descendants(pid: int) -> list[int]:
    """pid and every process below it (codec workers, forked storescp children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fp:
                fields = fp.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the tree, including reaped children (cutime, cstime)."""
    total = 0
    for member in descendants(pid):
        try:
            with open(f"/proc/{member}/stat") as fp:
                fields = fp.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])
    return total / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    total = 0
    for member in descendants(pid):
        try:
            with open(f"/proc/{member}/status") as fp:
                for line in fp:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def peak_hwm(pid: int) -> int:
    """The kernel's own high-water mark of the main process (catches spikes between samples)."""
    try:
        with open(f"/proc/{pid}/status") as fp:
            for line in fp:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ResourceSampler:
    """Peak RSS of a process tree, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ResourceSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, peak_hwm(self.pid))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(0.05)


def timed_transfer(
    *,
    pid: int,
    port: int,
    ae_title: str,
    files: Sequence[Path],
    associations: int,
    stored: Callable[[], int],
    alive: Callable[[], bool],
    wait_stored: bool,
    stall_timeout: float = 30.0,
) -> Sample:
    """Send files and time it; optionally keep timing until `stored()` reaches len(files)."""
    total_bytes = sum(f.stat().st_size for f in files)
    cpu_before = cpu_seconds(pid)
    with ResourceSampler(pid) as sampler:
        start = time.perf_counter()
        senders = send(port, ae_title, files, associations)
        codes = [p.wait() for p in senders]
        ack = time.perf_counter() - start
        failure = _sender_failure(codes, senders, alive)
        done = None
        if not failure and wait_stored:
            done, failure = _wait_until_stored(stored, len(files), alive, start, stall_timeout)
        elif not failure:
            done = ack
            # Timed to the last acknowledgement, but the CPU counted is the whole work: the
            # node's store workers may still be placing files.
            _wait_until_stored(stored, len(files), alive, start, stall_timeout)
        cpu = cpu_seconds(pid) - cpu_before if alive() else 0.0
    return Sample(len(files), total_bytes, ack, done, failure, sampler.peak, cpu)


def _sender_failure(codes: list[int], senders: list[subprocess.Popen], alive) -> str:
    if not alive():
        return "aborted (receiver died)"
    if any(codes):
        errors = b" ".join((p.stderr.read() if p.stderr else b"")[-200:] for p in senders)
        return f"failed (storescu exit {max(codes)}: {errors.decode(errors='replace').strip()})"
    return ""


def _wait_until_stored(
    stored: Callable[[], int], expected: int, alive, start: float, stall_timeout: float
) -> tuple[float | None, str]:
    last, last_change = -1, time.perf_counter()
    while True:
        count = stored()
        now = time.perf_counter()
        if count >= expected:
            return now - start, ""
        if count != last:
            last, last_change = count, now
        if not alive():
            return None, "aborted (receiver died)"
        if now - last_change > stall_timeout:
            return None, f"stalled ({count}/{expected} stored after {now - start:.0f} s)"
        time.sleep(0.01)
