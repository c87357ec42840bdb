"""A real HAProxy for tests (Debian's `haproxy`), in front of nodes on loopback.

Its configuration is the one docs/scale-out.md shows, read from that page: only the
frontend's port and the server lines change, and a stats socket is added so that a test
can wait until HAProxy sees a node up or down. Stopped by PID.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from tests.processes import REPO, ServerProcess, free_port, listening
from tests.tools import require_tool

SCALE_OUT_DOC = REPO / "docs" / "scale-out.md"


def documented_config() -> str:
    """The ```haproxy block of docs/scale-out.md."""
    match = re.search(r"```haproxy\n(.*?)```", SCALE_OUT_DOC.read_text(), flags=re.DOTALL)
    assert match, "docs/scale-out.md has no ```haproxy block"
    return match.group(1)


def config_for(port: int, servers: Sequence[tuple[str, int]], stats_socket: Path) -> str:
    """The documented configuration on `port`, with these (name, port) servers."""
    text = documented_config()
    assert "bind 127.0.0.1:11112" in text
    text = text.replace("bind 127.0.0.1:11112", f"bind 127.0.0.1:{port}")
    lines = [line for line in text.splitlines() if not line.strip().startswith("server ")]
    lines += [f"    server {name} 127.0.0.1:{server_port}" for name, server_port in servers]
    text = "\n".join(lines) + "\n"
    return text.replace(
        "global\n", f"global\n    stats socket {stats_socket} mode 600 level admin\n", 1
    )


class HAProxy(ServerProcess):
    label = "HAProxy"

    def __init__(self, folder: Path, servers: Sequence[tuple[str, int]]) -> None:
        self.exe = require_tool("haproxy")
        super().__init__(free_port(), folder / "haproxy.log", cwd=None)
        folder.mkdir(parents=True, exist_ok=True)
        self.stats_socket = folder / "haproxy.sock"
        self.config_path = folder / "haproxy.cfg"
        self.config_path.write_text(config_for(self.port, servers, self.stats_socket))

    def command(self) -> list[str]:
        return [self.exe, "-db", "-f", str(self.config_path)]

    def ready(self) -> bool:
        return listening(self.port) and self.stats_socket.exists()

    def server_states(self) -> dict[str, str]:
        """Each backend server's status as HAProxy sees it: UP, DOWN, ..."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(5)
            connection.connect(str(self.stats_socket))
            connection.sendall(b"show stat\n")
            data = b""
            while chunk := connection.recv(65536):
                data += chunk
        rows = data.decode().splitlines()
        header = rows[0].lstrip("# ").split(",")
        states = {}
        for row in rows[1:]:
            fields = dict(zip(header, row.split(","), strict=False))
            if fields.get("pxname") == "nodes" and fields.get("svname") not in (
                "BACKEND",
                "FRONTEND",
                None,
            ):
                states[fields["svname"]] = fields["status"].split()[0]
        return states

    def wait_for(self, wanted: dict[str, str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.server_states()
            if all(states.get(name) == state for name, state in wanted.items()):
                return
            time.sleep(0.1)
        raise AssertionError(f"HAProxy sees {self.server_states()}, not {wanted}")
