"""Helpers for the forwarding tests: DICOM peers as subprocesses and instance factories."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from tests.processes import NODELAY, ServerProcess
from tests.support import base_config, dicom_node, free_port, require_tool


class StoreSCP(ServerProcess):
    """DCMTK storescp writing every received instance into `folder` (uncompressed syntaxes only)."""

    label = "storescp"
    stop_timeout = 10.0

    def __init__(self, folder: Path, ae_title: str = "STORESCP", *args: str) -> None:
        log_path = folder.parent / f"{folder.name}.storescp.log"
        super().__init__(free_port(), log_path, env=NODELAY, cwd=None)
        self.folder = folder
        self.ae_title = ae_title
        self.args = args
        folder.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        storescp = require_tool("storescp")
        return [
            storescp,
            "-aet",
            self.ae_title,
            "-od",
            str(self.folder),
            *self.args,
            str(self.port),
        ]

    def start(self, wait: bool = True) -> StoreSCP:
        super().start(wait)
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def count(self) -> int:
        return len(self.files())


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


class RefusingSCP(ServerProcess):
    """A pynetdicom SCP. Modes: "refuse-mr" answers 0x0122 for MR Image Storage, "full"
    answers 0xA700 for everything, both until `allow_mr()`; "hang" never answers."""

    label = "refusing SCP"
    stop_timeout = 10.0

    def __init__(self, folder: Path, mode: str = "refuse-mr") -> None:
        super().__init__(free_port(), folder.parent / "refusing_scp.log")
        self.folder = folder
        self.mode = mode
        self.flag = folder.parent / f"{folder.name}.allow-mr"
        folder.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        script = self.folder.parent / "refusing_scp.py"
        script.write_text(REFUSING_SCP)
        return [
            sys.executable,
            str(script),
            str(self.port),
            str(self.folder),
            str(self.flag),
            self.mode,
        ]

    def start(self, wait: bool = True) -> RefusingSCP:
        super().start(wait)
        return self

    def allow_mr(self) -> None:
        self.flag.touch()

    def count(self) -> int:
        return len(list(self.folder.iterdir()))


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


def queue_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return dicom_node("queue", "-c", str(config), *args, timeout=60)
