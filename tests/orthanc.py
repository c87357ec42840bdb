"""A real Orthanc for tests: its own JSON config, loopback ports and folders; stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import free_port, require_tool


class Orthanc:
    """`/usr/sbin/Orthanc` with DICOM on `dicom_port` and REST on `http_port`, both loopback."""

    def __init__(
        self,
        folder: Path,
        ae_title: str = "ORTHANC",
        dicom_port: int = 0,
        modalities: dict[str, list[str | int]] | None = None,
    ) -> None:
        self.exe = require_tool("Orthanc")
        self.folder = folder
        self.ae_title = ae_title
        # DicomModalities: the peers Orthanc may C-STORE to, {name: [AE title, host, port]}.
        self.modalities = modalities or {}
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "orthanc.json"
        self.log_path = folder / "orthanc.log"
        self.config_path.write_text(json.dumps(self._config(), indent=2))

    def _config(self) -> dict[str, Any]:
        return {
            "Name": f"test-{self.ae_title}",
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "DicomScpTimeout": 30,
            "StableAge": 60,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "DicomModalities": self.modalities,
        }

    def start(self, timeout: float = 30.0) -> Orthanc:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [self.exe, str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited at start; log:\n{self.log()}")
            try:
                self.get("/system")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"Orthanc REST API not up after {timeout} s; log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"[", b"{") else body

    def instances(self) -> list[str]:
        """Orthanc's instance ids (not SOP Instance UIDs)."""
        return list(self.get("/instances"))

    def count(self) -> int:
        return len(self.instances())

    def file(self, instance_id: str) -> bytes:
        return bytes(self.get(f"/instances/{instance_id}/file"))

    def files(self) -> list[bytes]:
        return [self.file(i) for i in self.instances()]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
