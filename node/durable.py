"""Small helpers for writes that survive a crash or a power cut."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

COPY_STEP = 64 * 1024 * 1024


@dataclass(frozen=True)
class FileRegion:
    """Bytes already on disk: `length` bytes of `path` from `offset`.

    Written by a kernel copy (copy_file_range), so a multi-GB instance never
    passes through the process's memory.
    """

    path: Path
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


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


def write_new_file(path: Path, chunks: Iterable[bytes | memoryview | FileRegion]) -> int:
    """Write chunks to a file that must not exist yet, fsync it, and return its size.

    On any error the partial file is removed before the error propagates.
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    size = 0
    try:
        for chunk in chunks:
            if isinstance(chunk, FileRegion):
                size += _copy_region(chunk, descriptor)
                continue
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


def _copy_region(region: FileRegion, descriptor: int) -> int:
    with region.path.open("rb") as source:
        offset, left = region.offset, region.length
        while left:
            step = min(left, COPY_STEP)
            try:
                copied = os.copy_file_range(source.fileno(), descriptor, step, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                copied = _copy_through_memory(source.fileno(), descriptor, step, offset)
            if not copied:
                raise OSError(f"{region.path} ended {left} bytes before the expected end")
            offset += copied
            left -= copied
    return region.length


def _copy_through_memory(source: int, descriptor: int, length: int, offset: int) -> int:
    """The fallback where the kernel cannot copy between these files: 8 MiB at a time."""
    done = 0
    while done < length:
        data = os.pread(source, min(length - done, 8 * 1024 * 1024), offset + done)
        if not data:
            break
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        done += len(data)
    return done


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
