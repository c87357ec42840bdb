"""Small helpers for writes that survive a crash or a power cut."""

from __future__ import annotations

import errno
import os
import threading
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


class SharedDirectorySync:
    """fsync a folder on behalf of many threads: one fsync covers every entry made before it.

    Concurrent intakes each need their new spool file's directory entry on disk;
    an fsync that starts after a caller's rename covers that rename, so callers
    that arrive while one is running share the next one instead of each queueing
    its own journal commit. Each caller returns only once such an fsync has
    finished; if the latest one failed, the caller gets its error (any later
    fsync would cover it too, so only the latest outcome matters).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._changed = threading.Condition()
        self._started = 0  # generations of fsyncs begun
        self._finished = 0  # and ended
        self._running = False
        self._last_error: OSError | None = None  # outcome of the latest finished fsync

    def sync(self) -> None:
        with self._changed:
            # A running fsync may have begun before our change: only the next one counts.
            needed = self._started + 1
            while self._finished < needed:
                if self._running:
                    self._changed.wait()
                    continue
                self._run_one()
            error = self._last_error
        if error is not None:
            raise error

    def _run_one(self) -> None:
        self._running = True
        self._started += 1
        generation = self._started
        self._changed.release()
        error: OSError | None = None
        try:
            fsync_directory(self.folder)
        except OSError as exc:
            error = exc
        finally:
            self._changed.acquire()
            self._running = False
            self._finished = generation
            self._last_error = error
            self._changed.notify_all()


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
    """Give target (a new name) the content of source: a hard link when both are on one
    filesystem, else a kernel copy (copy_file_range), fsynced. Raises FileExistsError if
    target exists."""
    try:
        os.link(source, target)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in LINK_REFUSED:
            raise
    write_new_file(target, [FileRegion(source, 0, source.stat().st_size)])


# link() fails with these where a copy still works: another filesystem (EXDEV), one
# without hard links (EPERM, e.g. FAT or some network shares), too many links (EMLINK).
LINK_REFUSED = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP})


class FolderSyncs:
    """SharedDirectorySync for any folder: store workers placing files into one series
    folder at the same time share its fsyncs, and each still returns only after an fsync
    that began after its own link."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._syncs: dict[Path, SharedDirectorySync] = {}

    def sync(self, folder: Path) -> None:
        with self._lock:
            shared = self._syncs.get(folder)
            if shared is None:
                if len(self._syncs) >= self.limit:
                    # Forgetting a folder only loses sharing: its next caller runs its own fsync.
                    self._syncs.clear()
                shared = self._syncs[folder] = SharedDirectorySync(folder)
        shared.sync()
