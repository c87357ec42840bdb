"""sd_notify: tell systemd that the node is ready, alive, reloading or stopping.

The protocol is one datagram of newline-separated KEY=VALUE lines sent to the
socket named in $NOTIFY_SOCKET (a path, or '@name' for the abstract namespace).
A dozen lines of our own are simpler than a dependency. Without $NOTIFY_SOCKET
(a terminal, a test, another supervisor) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("node.notify")


def _socket_address(name: str) -> str | bytes:
    # '@' marks Linux's abstract namespace, spelled with a leading NUL byte.
    return b"\0" + name[1:].encode() if name.startswith("@") else name


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if no watchdog is asked.

    WATCHDOG_PID, when set, must be our PID: otherwise the watchdog is meant for another process.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


class Notifier:
    """Sends state changes to systemd's notification socket, if there is one."""

    def __init__(self, address: str | None = None) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET", "") if address is None else address
        self._socket: socket.socket | None = None
        if self.address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *lines: str) -> bool:
        """Send one notification; a lost notification is logged, never fatal."""
        if self._socket is None:
            return False
        try:
            self._socket.sendto("\n".join(lines).encode(), _socket_address(self.address))
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) wants the CLOCK_MONOTONIC time of the reload start.
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping: finishing associations and jobs")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
