"""A real Orthanc for tests: its own JSON config, loopback ports and folders; stopped by PID."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.processes import NODELAY, ServerProcess
from tests.support import free_port, require_tool
from tests.tools import missing_tool

# Where Debian's orthanc-dicomweb puts its plugin (DICOMweb: STOW-RS, QIDO-RS, WADO-RS).
DICOMWEB_PLUGINS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    *sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*")),
)


def dicomweb_plugin() -> Path:
    """The DICOMweb plugin's library, or skip the test (fail it in CI) when it is missing."""
    for path in DICOMWEB_PLUGINS:
        if path.exists():
            return path
    missing_tool("the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")


class Orthanc(ServerProcess):
    """`/usr/sbin/Orthanc` with DICOM on `dicom_port` and REST on `http_port`, both loopback.

    Ready when its REST API answers; stopped by SIGTERM, killed after 20 s.
    """

    label = "Orthanc"
    start_timeout = 30.0

    def __init__(
        self,
        folder: Path,
        ae_title: str = "ORTHANC",
        dicom_port: int = 0,
        modalities: dict[str, list[str | int]] | None = None,
        plugins: tuple[Path, ...] = (),
        http_auth: tuple[str, str] | None = None,
    ) -> None:
        self.exe = require_tool("Orthanc")
        self.dicom_port = dicom_port or free_port()
        super().__init__(self.dicom_port, folder / "orthanc.log", env=NODELAY, cwd=None)
        self.folder = folder
        self.ae_title = ae_title
        # DicomModalities: the peers Orthanc may C-STORE to, {name: [AE title, host, port]}.
        self.modalities = modalities or {}
        # Plugins to load (e.g. dicomweb_plugin(), served under /dicom-web/), and HTTP basic
        # auth (user, password) for every REST request, ours included.
        self.plugins = plugins
        self.http_auth = http_auth
        self.http_port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "orthanc.json"
        self.config_path.write_text(json.dumps(self._config(), indent=2))

    def _config(self) -> dict[str, Any]:
        return {
            "Name": f"test-{self.ae_title}",
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.http_auth is not None,
            "RegisteredUsers": dict([self.http_auth]) if self.http_auth else {},
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "StorageCompression": False,
            "Plugins": [str(plugin) for plugin in self.plugins],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "HttpServerEnabled": True,
            "DicomScpTimeout": 30,
            "StableAge": 60,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "DicomModalities": self.modalities,
        }

    def command(self) -> list[str]:
        return [self.exe, str(self.config_path)]

    def ready(self) -> bool:
        try:
            self.get("/system")
        except (OSError, urllib.error.URLError):
            return False
        return True

    def start(self, wait: bool = True) -> Orthanc:
        super().start(wait)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _headers(self) -> dict[str, str]:
        if self.http_auth is None:
            return {}
        pair = ":".join(self.http_auth).encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}

    def get(self, path: str, headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.url}{path}", headers={**self._headers(), **(headers or {})}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"[", b"{") else body

    def post(self, path: str, body: bytes, content_type: str, timeout: float = 60) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=body,
            method="POST",
            headers={"Content-Type": content_type, **self._headers()},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def upload(self, file: Path) -> str:
        """POST /instances: Orthanc holds the file as it is; its instance id."""
        return str(self.post("/instances", file.read_bytes(), "application/dicom")["ID"])

    def store_to(self, modality: str, instance_ids: list[str]) -> dict[str, Any]:
        """Orthanc C-STOREs the instances to one of its DicomModalities; the finished job."""
        body = json.dumps({"Resources": instance_ids, "Synchronous": True}).encode()
        return dict(self.post(f"/modalities/{modality}/store", body, "application/json"))

    def instances(self) -> list[str]:
        """Orthanc's instance ids (not SOP Instance UIDs)."""
        return list(self.get("/instances"))

    def count(self) -> int:
        return len(self.instances())

    def file(self, instance_id: str) -> bytes:
        return bytes(self.get(f"/instances/{instance_id}/file"))

    def files(self) -> list[bytes]:
        return [self.file(i) for i in self.instances()]

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
