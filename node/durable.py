"""Small helpers for writes that survive a crash or a power cut."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def fsync_directory(folder: Path) -> None:
    """Persist a rename or link: the directory entry lives in the folder, not the file."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_directories(folder: Path) -> None:
    """mkdir -p whose new entries survive a power cut: each new folder's parent is fsynced.

    Without this, a file renamed into a fresh Patient/Study/Series folder is on
    disk, but the folder itself may vanish on power loss, taking the file along
    after its spool copy has been deleted.
    """
    missing: list[Path] = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        # Another worker may make it first: fsync anyway, our file depends on it too.
        new.mkdir(exist_ok=True)
        fsync_directory(new.parent)


def write_new_file(path: Path, chunks: Iterable[bytes | memoryview]) -> int:
    """Write chunks to a file that must not exist yet, fsync it, and return its size.

    On any error the partial file is removed before the error propagates.
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    size = 0
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                written = os.write(descriptor, view)
                view = view[written:]
                size += written
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        path.unlink(missing_ok=True)
        raise
    os.close(descriptor)
    return size


def link_or_copy(source: Path, target: Path) -> None:
    """Give target the content of source: a hard link when possible, else an fsynced copy."""
    try:
        os.link(source, target)
        return
    except OSError:
        pass
    try:
        with source.open("rb") as reader, target.open("xb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
            writer.flush()
            os.fsync(writer.fileno())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
