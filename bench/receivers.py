"""The receivers under test, each started by the benchmark on a free loopback port.

Every receiver runs in its own fresh folder, is stopped by its PID and says
how many instances it has placed so far (so end-to-end time can be measured
until the last file is stored, not only until the last acknowledgement).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NODE_AE = "DICOMNODE"
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}


class ToolMissing(RuntimeError):
    """A program the benchmark needs is not installed."""


def tool(name: str, debian_path: str) -> str:
    """DCMTK and Orthanc from the Debian packages; never pynetdicom's same-named apps."""
    if Path(debian_path).exists():
        return debian_path
    found = shutil.which(name)
    if found is None or "venv" in found:
        raise ToolMissing(f"{name} not found: apt-get install dcmtk orthanc")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    """Whether a socket listens on the port, read from /proc: connecting to probe would
    leave a half-open association behind that a receiver may wait for when stopping."""
    hex_port = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fp:
                next(fp)
                for line in fp:
                    fields = line.split()
                    if fields[1].endswith(hex_port) and fields[3] == "0A":  # 0A = LISTEN
                        return True
        except OSError:
            continue
    return False


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with code {process.returncode} before listening")
        if listening(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def count_files(root: Path, pattern: str = "*") -> int:
    """Files under root, ignoring hidden folders (staging areas such as .incoming)."""
    total = 0
    for _folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        total += sum(1 for f in files if not f.startswith(".") and Path(f).match(pattern))
    return total


class Receiver:
    """A receiver process in a folder of its own."""

    ae_title = "ANY-SCP"
    label = "receiver"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return NODELAY_ENV

    def start(self) -> Receiver:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = (self.workdir / "receiver.log").open("ab")
        self.process = subprocess.Popen(
            self.command(),
            cwd=REPO,
            env=self.env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port, self.process)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stored(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is None:
            return
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._kill_leftover_group()
        if self._log:
            self._log.close()

    def _kill_leftover_group(self) -> None:
        # storescp --fork children and the node's codec workers share our session.
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        path = self.workdir / "receiver.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Storescp(Receiver):
    """DCMTK storescp writing files; --fork for concurrent associations (how one deploys it)."""

    label = "storescp"

    def __init__(self, workdir: Path, fork: bool = False) -> None:
        super().__init__(workdir)
        self.fork = fork
        self.folder = workdir / "files"

    def command(self) -> list[str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        return [
            tool("storescp", "/usr/bin/storescp"),
            "--max-pdu",
            "131072",
            *(["--fork"] if self.fork else []),
            "-od",
            str(self.folder),
            str(self.port),
        ]

    def stored(self) -> int:
        return count_files(self.folder)


class Orthanc(Receiver):
    """Orthanc from the Debian package with its own JSON config (fsync is its default)."""

    ae_title = "ORTHANC"
    label = "Orthanc"

    def __init__(self, workdir: Path, ingest_transcoding: str | None = None) -> None:
        super().__init__(workdir)
        self.ingest_transcoding = ingest_transcoding
        self.storage = workdir / "storage"

    def command(self) -> list[str]:
        config = {
            "Name": "bench",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": free_port(),
            "HttpServerEnabled": False,
            "RemoteAccessAllowed": False,
            "DicomCheckCalledAet": False,
            "TcpNoDelay": True,
            "StorageCompression": False,
            "SyncStorageArea": True,
            "Plugins": [],
        }
        if self.ingest_transcoding:
            config["IngestTranscoding"] = self.ingest_transcoding
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return [tool("Orthanc", "/usr/sbin/Orthanc"), str(path)]

    def stored(self) -> int:
        # Orthanc acknowledges after storing (and after ingest transcoding).
        return count_files(self.storage) if self.storage.exists() else 0


class Node(Receiver):
    """dicom-node as a subprocess, with the shipped defaults except the listed overrides."""

    ae_title = NODE_AE
    label = "node"
    # [node] keys every node in this benchmark run gets (run.py --node KEY=VALUE).
    extra_options: dict[str, object] = {}  # noqa: RUF012

    def __init__(
        self,
        workdir: Path,
        *,
        storage_syntax: str | None = None,
        destination_port: int | None = None,
        node_options: dict[str, object] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.storage_syntax = storage_syntax
        self.destination_port = destination_port
        self.node_options = node_options or {}
        self.archive = workdir / "archive"

    def command(self) -> list[str]:
        config = self.workdir / "config.toml"
        config.write_text(self.config_text())
        return [sys.executable, "-m", "node", "run", "-c", str(config)]

    def config_text(self) -> str:
        node = {
            "ae_title": NODE_AE,
            "host": "127.0.0.1",
            "port": self.port,
            "data_dir": str(self.workdir / "data"),
            **self.extra_options,
            **self.node_options,
        }
        lines = ["[node]", *(f"{k} = {_toml(v)}" for k, v in node.items())]
        lines += ["[limits]", "min_free_space = 0"]
        if self.destination_port is None:
            lines += ["[[storage]]", 'name = "archive"', f"path = {_toml(str(self.archive))}"]
            if self.storage_syntax:
                lines.append(f"transfer_syntax = {_toml(self.storage_syntax)}")
        else:
            lines += [
                "[[destination]]",
                'name = "pacs"',
                'ae_title = "ANY-SCP"',
                'host = "127.0.0.1"',
                f"port = {self.destination_port}",
            ]
        return "\n".join(lines) + "\n"

    def stored(self) -> int:
        return count_files(self.archive, "*.dcm") if self.archive.exists() else 0

    def stored_syntax(self) -> str | None:
        """Transfer syntax UID of one stored file, to check that transcoding really happened."""
        import pydicom

        for path in self.archive.rglob("*.dcm"):
            if ".incoming" not in path.parts:
                meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
                return str(meta.TransferSyntaxUID)
        return None


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)
