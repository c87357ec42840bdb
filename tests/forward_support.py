"""Helpers for the forwarding tests: DICOM peers as subprocesses and instance factories."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.support import REPO, base_config, dicom_node, free_port, require_tool, wait_for_port


class StoreSCP:
    """DCMTK storescp writing every received instance into `folder` (uncompressed syntaxes only)."""

    def __init__(self, folder: Path, ae_title: str = "STORESCP", *args: str) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def log_path(self) -> Path:
        return self.folder.parent / f"{self.folder.name}.storescp.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> StoreSCP:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                require_tool("storescp"),
                "-aet",
                self.ae_title,
                "-od",
                str(self.folder),
                *list(self.args),
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        wait_for_port(self.port)
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def count(self) -> int:
        return len(self.files())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


REFUSING_SCP = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
    from pynetdicom.sop_class import MRImageStorage

    port, out, allow_flag = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "refuse-mr"

    def on_store(event):
        if mode == "hang":  # never answer: a destination stuck mid C-STORE
            time.sleep(3600)
        if mode == "full" and not allow_flag.exists():
            return 0xA700  # out of resources, until the flag file exists
        # Permanently refuse MR (0x0122 SOP class not supported) until the flag file exists.
        if event.request.AffectedSOPClassUID == MRImageStorage and not allow_flag.exists():
            return 0x0122
        (out / event.request.AffectedSOPInstanceUID).write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE("REFUSER")
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    """
)


class RefusingSCP:
    """A pynetdicom SCP. Modes: "refuse-mr" answers 0x0122 for MR Image Storage, "full"
    answers 0xA700 for everything, both until `allow_mr()`; "hang" never answers."""

    def __init__(self, folder: Path, mode: str = "refuse-mr") -> None:
        self.folder = folder
        self.mode = mode
        self.port = free_port()
        self.flag = folder.parent / f"{folder.name}.allow-mr"
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> RefusingSCP:
        script = self.folder.parent / "refusing_scp.py"
        script.write_text(REFUSING_SCP)
        log = (self.folder.parent / "refusing_scp.log").open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(self.port),
                str(self.folder),
                str(self.flag),
                self.mode,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        wait_for_port(self.port)
        return self

    def allow_mr(self) -> None:
        self.flag.touch()

    def count(self) -> int:
        return len(list(self.folder.iterdir()))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def destination(name: str, ae_title: str, port: int, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "ae_title": ae_title,
        "host": "127.0.0.1",
        "port": port,
        "idle_timeout": 2.0,
        "retry": {"initial_delay": 1, "max_delay": 5},
        **extra,
    }


def forwarding_config(
    tmp: Path,
    port: int,
    destinations: Sequence[dict[str, object]],
    routes: Sequence[dict[str, object]] = (),
    **sections: object,
) -> dict[str, object]:
    config = base_config(tmp, port)
    config["destination"] = list(destinations)
    if routes:
        config["route"] = list(routes)
    config.update(sections)
    return config


def copies_with_new_uids(source: Path, folder: Path, count: int) -> list[Path]:
    """`count` copies of a file, each with a fresh SOP Instance UID (the pixels are the same)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    paths = []
    for index in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sop_instance_uid(data: bytes | Path) -> str:
    from io import BytesIO

    source = BytesIO(data) if isinstance(data, bytes) else data
    return str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)


def queue_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return dicom_node("queue", "-c", str(config), *args, timeout=60)
