"""Forwarding latency: from the sender's acknowledgement to the file at each destination.

storescu runs verbose so that each "Received Store Response" is timestamped as it
arrives; each destination is a DCMTK storescp, whose file for an instance is
written before it answers, so the file's modification time is when the node
delivered it. The delay is (delivered - acknowledged) per instance and destination.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.receivers import NODELAY_ENV, Storescp, tool

SENDING = "I: Sending file: "
ACKNOWLEDGED = "I: Received Store Response (Success"


@dataclass(frozen=True)
class Latency:
    """Acknowledgement -> delivery delays of one run, seconds, over every destination."""

    delays: tuple[float, ...]
    per_destination: tuple[tuple[str, float], ...]  # (destination, worst delay)
    missing: int  # acknowledged instances some destination never got

    @property
    def median(self) -> float:
        return statistics.median(self.delays) if self.delays else float("nan")

    @property
    def p99(self) -> float:
        if not self.delays:
            return float("nan")
        ordered = sorted(self.delays)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def send_timed(
    port: int, ae_title: str, files: Sequence[Path], associations: int
) -> dict[Path, float]:
    """Send like bench.measure.send, and return each file's acknowledgement time (time.time())."""
    storescu = tool("storescu", "/usr/bin/storescu")
    acked: dict[Path, float] = {}
    lock = threading.Lock()

    def one(share: list[Path]) -> None:
        command = [storescu, "-v", "-aec", ae_title, "-aet", "BENCH", "127.0.0.1", str(port)]
        with subprocess.Popen(
            [*command, *map(str, share)],
            env=NODELAY_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as sender:
            assert sender.stdout is not None
            current: Path | None = None
            for line in sender.stdout:
                if line.startswith(SENDING):
                    current = Path(line[len(SENDING) :].strip())
                elif line.startswith(ACKNOWLEDGED) and current is not None:
                    with lock:
                        acked[current] = time.time()

    shares = [list(files[i::associations]) for i in range(associations)]
    threads = [threading.Thread(target=one, args=(share,)) for share in shares if share]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return acked


def delivered_times(destination: Storescp) -> dict[str, float]:
    """SOP Instance UID -> when storescp wrote its file (storescp names files MODALITY.UID)."""
    found = {}
    for entry in os.scandir(destination.folder):
        uid = entry.name.split(".", 1)[1] if "." in entry.name else entry.name
        found[uid] = entry.stat().st_mtime
    return found


def wait_delivered(destinations: Sequence[Storescp], expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(d.stored() >= expected for d in destinations):
            return
        time.sleep(0.05)


def measure_latency(
    acked: dict[Path, float], uids: dict[Path, str], destinations: Sequence[Storescp]
) -> Latency:
    delays: list[float] = []
    worst: list[tuple[str, float]] = []
    missing = 0
    for index, destination in enumerate(destinations):
        delivered = delivered_times(destination)
        mine = []
        for path, at in acked.items():
            when = delivered.get(uids[path])
            if when is None:
                missing += 1
                continue
            mine.append(max(0.0, when - at))
        delays += mine
        worst.append((f"pacs{index or ''}", max(mine, default=float("nan"))))
    return Latency(tuple(delays), tuple(worst), missing)
