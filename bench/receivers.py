"""The receivers under test, each started by the benchmark on a free loopback port.

Every receiver runs in its own fresh folder, is stopped by its PID and says
how many instances it has placed so far (so end-to-end time can be measured
until the last file is stored, not only until the last acknowledgement).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The process plumbing is shared with the tests (stdlib only, no pytest): one way to
# pick ports, start, wait and stop by PID.
from tests.processes import NODELAY, ServerProcess, find_tool, free_port, listening

NODE_AE = "DICOMNODE"
NODELAY_ENV = {**os.environ, **NODELAY}


class ToolMissing(RuntimeError):
    """A program the benchmark needs is not installed."""


def tool(name: str, debian_path: str) -> str:
    """DCMTK and Orthanc from the Debian packages; never pynetdicom's same-named apps."""
    if Path(debian_path).exists():
        return debian_path
    found = find_tool(name)
    if found is None:
        raise ToolMissing(f"{name} not found: apt-get install dcmtk orthanc")
    return found


def count_files(root: Path, pattern: str = "*") -> int:
    """Files under root, ignoring hidden folders (staging areas such as .incoming)."""
    total = 0
    for _folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        total += sum(1 for f in files if not f.startswith(".") and Path(f).match(pattern))
    return total


class Receiver(ServerProcess):
    """A receiver process in a folder of its own, in a session of its own."""

    ae_title = "ANY-SCP"
    label = "receiver"
    start_timeout = 30.0
    own_session = True

    def __init__(self, workdir: Path) -> None:
        super().__init__(free_port(), workdir / "receiver.log", env=NODELAY)
        self.workdir = workdir

    def ready(self) -> bool:
        return listening(self.port)

    def stored(self) -> int:
        raise NotImplementedError


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
        destination_ports: tuple[int, ...] = (),
    ) -> None:
        super().__init__(workdir)
        self.storage_syntax = storage_syntax
        self.destination_ports = (
            (destination_port,) if destination_port is not None else destination_ports
        )
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
        if not self.destination_ports:
            lines += ["[[storage]]", 'name = "archive"', f"path = {_toml(str(self.archive))}"]
            if self.storage_syntax:
                lines.append(f"transfer_syntax = {_toml(self.storage_syntax)}")
        for index, port in enumerate(self.destination_ports):
            lines += [
                "[[destination]]",
                f'name = "pacs{index or ""}"',
                'ae_title = "ANY-SCP"',
                'host = "127.0.0.1"',
                f"port = {port}",
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


class OrthancDicomweb(Orthanc):
    """Orthanc with its DICOMweb plugin: C-STORE on `port`, STOW-RS under `url`."""

    label = "Orthanc DICOMweb"
    PLUGINS = (
        Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
        *sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*")),
    )

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.http_port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def command(self) -> list[str]:
        command = super().command()
        plugin = next((p for p in self.PLUGINS if p.exists()), None)
        if plugin is None:
            raise ToolMissing(
                "Orthanc's DICOMweb plugin not found: apt-get install orthanc-dicomweb"
            )
        path = Path(command[-1])
        config = json.loads(path.read_text())
        config.update(
            HttpServerEnabled=True,
            HttpPort=self.http_port,
            AuthenticationEnabled=False,
            Plugins=[str(plugin)],
            DicomWeb={"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        )
        path.write_text(json.dumps(config, indent=2))
        return command


class StowNode(Node):
    """The node forwarding everything to one DICOMweb destination by STOW-RS."""

    label = "node STOW-RS"

    def __init__(self, workdir: Path, url: str, batch_size: int = 50) -> None:
        super().__init__(workdir, destination_port=0)
        self.url = url
        self.batch_size = batch_size

    def config_text(self) -> str:
        head = super().config_text().split("[[destination]]", 1)[0]
        destination = [
            "[[destination]]",
            'name = "pacs"',
            'protocol = "dicomweb"',
            f"url = {_toml(self.url)}",
            f"batch_size = {self.batch_size}",
        ]
        return head + "\n".join(destination) + "\n"
