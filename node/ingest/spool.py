"""The spool: received instances, written durably as DICOM Part 10 files.

A spooled file holds the file meta information we build plus the dataset
bytes exactly as the sender encoded them. Nothing is decoded or re-encoded:
that is the workers' job, after the sender has its answer.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import generate_uid

from node import __version__
from node.store.durable import FileRegion, SharedDirectorySync, make_directories, write_new_file

# Stable across releases: derived from the product name, under pydicom's UID root.
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["dicom-node"])
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]
PREAMBLE = b"\x00" * 128 + b"DICM"
PARTIAL_SUFFIX = ".part"
SPOOLED_SUFFIX = ".dcm"


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    size: int


def part10_header(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, calling_ae_title: str
) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group for a received dataset.

    Encoded by hand: it is built once per received instance, and pydicom's writer
    cost a tenth of a C-STORE's handling. tests/ingest/test_spool_meta.py holds it to
    pydicom's output byte for byte.
    """
    elements = [
        _explicit(0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, b"UI", _uid(sop_class_uid)),
        _explicit(0x0003, b"UI", _uid(sop_instance_uid)),
        _explicit(0x0010, b"UI", _uid(transfer_syntax)),
        _explicit(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
        _explicit(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
    ]
    if calling_ae_title:
        elements.append(_explicit(0x0016, b"AE", _text(calling_ae_title)))
    group = b"".join(elements)
    length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(group))
    return PREAMBLE + length + group


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # a 4-byte length after two reserved bytes (PS3.5 7.1.2)
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def _text(text: str) -> bytes:
    value = text.encode("ascii", errors="replace")
    return value + b" " if len(value) % 2 else value


class Spool:
    """A folder of durable, complete Part 10 files; partial writes never survive."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._directory = SharedDirectorySync(root)

    def prepare(self, recorded: Collection[Path] | None = None) -> None:
        """Create the folder and drop what a crash may have left behind.

        That is partial files, and, given the spool files the queue has recorded,
        complete files that were never recorded: a crash between the rename and
        the queue commit. Their sender never got Success, so it sends them again.
        """
        make_directories(self.root)
        for partial in self.root.glob(f"*{PARTIAL_SUFFIX}"):
            partial.unlink(missing_ok=True)
        if recorded is None:
            return
        names = {path.name for path in recorded}
        for unrecorded in self.root.glob(f"*{SPOOLED_SUFFIX}"):
            if unrecorded.name not in names:
                unrecorded.unlink(missing_ok=True)

    def write(self, header: bytes, dataset: bytes | memoryview | FileRegion) -> SpooledFile:
        """Write header + dataset to a new file: temp file, fsync, rename, fsync folder."""
        name = uuid.uuid4().hex
        partial = self.root / f"{name}{PARTIAL_SUFFIX}"
        final = self.root / f"{name}{SPOOLED_SUFFIX}"
        size = write_new_file(partial, (header, dataset))
        try:
            os.rename(partial, final)
            self._directory.sync()
        except BaseException:
            partial.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise
        return SpooledFile(path=final, size=size)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        # Transcoded copies made for destinations (node.derived) go with their source.
        # A plain listing, not glob(): this runs once per instance and the folder is
        # usually empty.
        derived = self.root / "derived"
        try:
            names = os.listdir(derived)
        except FileNotFoundError:
            return
        prefix = f"{path.stem}."
        for name in names:
            if name.startswith(prefix) and name.endswith(SPOOLED_SUFFIX):
                (derived / name).unlink(missing_ok=True)
