"""DCMTK storescu as the modality: send files in their own transfer syntax and read back
the status the peer answered for each file.

storescu proposes only uncompressed syntaxes by default and has no flag for some
syntaxes (e.g. JPEG Lossless process 14), so we write a storescu association
config file (`-xf FILE PROFILE`) with one profile per transfer syntax: each
profile proposes every SOP class of its batch with exactly that syntax. A file
then goes out as it is on disk, never converted by storescu.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from tests.support import require_tool

# PS3.8: presentation context IDs are odd numbers 1..255.
MAX_CONTEXTS = 128

_SENDING = re.compile(r"^I: Sending file: (?P<path>.+)$")
_STATUS = re.compile(r"^D: DIMSE Status\s*: 0x(?P<code>[0-9a-fA-F]{4})")


@dataclass(frozen=True)
class SendableFile:
    """A file storescu can send: it has file meta (for its syntax) and a SOP Class UID."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


@dataclass
class Classified:
    """Every corpus file lands in exactly one bucket: sendable or unsendable with a reason."""

    sendable: list[SendableFile] = field(default_factory=list)
    unsendable: dict[Path, str] = field(default_factory=dict)


def classify(paths: Iterable[Path]) -> Classified:
    """Sort files into what storescu can send and what it cannot, saying why."""
    result = Classified()
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            result.unsendable[path] = f"pydicom cannot read it ({type(exc).__name__})"
            continue
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        if syntax is None:
            result.unsendable[path] = "no file meta / Transfer Syntax UID"
        elif "SOPClassUID" not in ds:
            result.unsendable[path] = "no SOP Class UID"
        elif "SOPInstanceUID" not in ds:
            result.unsendable[path] = "no SOP Instance UID"
        else:
            result.sendable.append(
                SendableFile(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(syntax))
            )
    return result


def by_syntax(files: Sequence[SendableFile]) -> dict[str, list[SendableFile]]:
    batches: dict[str, list[SendableFile]] = {}
    for item in files:
        batches.setdefault(item.transfer_syntax, []).append(item)
    return batches


def write_profile(path: Path, syntax: str, sop_classes: Sequence[str]) -> str:
    """A storescu config with one profile proposing each SOP class with exactly `syntax`."""
    if len(sop_classes) > MAX_CONTEXTS:
        raise ValueError(f"{len(sop_classes)} SOP classes need more than {MAX_CONTEXTS} contexts")
    lines = ["[[TransferSyntaxes]]", "[AsSent]", f"TransferSyntax1 = {syntax}", ""]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    lines += [
        f"PresentationContext{index} = {uid}\\AsSent"
        for index, uid in enumerate(sop_classes, start=1)
    ]
    lines += ["", "[[Profiles]]", "[AsSent]", "PresentationContexts = Contexts", ""]
    path.write_text("\n".join(lines))
    return "AsSent"


@dataclass(frozen=True)
class StorescuRun:
    returncode: int
    statuses: dict[Path, int]  # file -> DIMSE status the peer answered
    not_sent: dict[Path, str]  # file -> why storescu did not get a response for it
    output: str


def parse_output(output: str, files: Sequence[Path]) -> tuple[dict[Path, int], dict[Path, str]]:
    """Per-file DIMSE status from `storescu -d` output; files without one, with storescu's reason."""
    statuses: dict[Path, int] = {}
    complaints: dict[Path, list[str]] = {}
    current: Path | None = None
    for line in output.splitlines():
        if found := _SENDING.match(line):
            current = Path(found["path"])
        elif (found := _STATUS.match(line)) and current is not None:
            statuses[current] = int(found["code"], 16)
            current = None
        elif line.startswith(("E: ", "W: ")):
            about = next((p for p in files if str(p) in line), current)
            if about is not None:
                complaints.setdefault(about, []).append(line)
    not_sent = {
        path: " | ".join(complaints.get(path, ["storescu gave no reason"]))
        for path in files
        if path not in statuses
    }
    return statuses, not_sent


def send_as_is(
    port: int,
    files: Sequence[Path],
    syntax: str,
    sop_classes: Sequence[str],
    workdir: Path,
    *,
    aec: str = "DICOMNODE",
    aet: str = "STORESCU",
    timeout: float = 300,
) -> StorescuRun:
    """Send files of one transfer syntax on one association, each in that syntax."""
    exe = require_tool("storescu")
    config = workdir / f"storescu-{syntax}.cfg"
    profile = write_profile(config, syntax, sorted(set(sop_classes)))
    completed = subprocess.run(
        [
            exe,
            "-d",
            "-nh",
            "-aec",
            aec,
            "-aet",
            aet,
            "-xf",
            str(config),
            profile,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    output = completed.stdout + completed.stderr
    statuses, not_sent = parse_output(output, files)
    return StorescuRun(completed.returncode, statuses, not_sent, output)
