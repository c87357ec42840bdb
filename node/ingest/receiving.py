"""Where a C-STORE dataset is held while its fragments arrive: memory first, then a file.

Most instances (a CT slice is 0.5 MB) are collected in memory and written once,
by the spool. A large one spills to a file beside the spool, on the disk the
free-space check watches, so a 1 GiB multi-frame instance costs a few MiB of
RAM however big it is; intake maps that file and the spool copies from it in
the kernel. A failed write (a full disk) is remembered, not raised: the rest of
the dataset is still read, so the SCP can answer Out of Resources instead of
aborting the association.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from node.store.durable import FileRegion

SPILL_AT = 8 * 1024 * 1024


class ReceiveFailed(OSError):
    """The dataset could not be written to disk while it arrived (a full disk, usually)."""


def prepare_receiving_folder(folder: Path) -> None:
    """Create the folder and drop a crashed run's files: they were never acknowledged."""
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.iterdir():
        leftover.unlink(missing_ok=True)


class ArrivingDataset:
    """One dataset's fragments, in arrival order.

    The reader fills `region(n)` straight from the socket and then calls
    `filled(n)`: one copy from the kernel into memory, none for the bookkeeping.
    The memory is the association's `buffer`, reused from one C-STORE to the
    next, so a stream of instances does not allocate (and page in) a new buffer
    each time.
    """

    def __init__(
        self, folder: Path, buffer: bytearray | None = None, spill_at: int = SPILL_AT
    ) -> None:
        self.folder = folder
        self.spill_at = spill_at
        self.size = 0
        self.error: OSError | None = None
        self._memory = buffer if buffer is not None else bytearray()
        self._scratch: bytearray | None = None  # a fragment on its way to the spill file
        self._fd: int | None = None
        self._path: Path | None = None

    @property
    def buffer(self) -> bytearray:
        """The memory buffer, for the next dataset of the association to reuse."""
        return self._memory

    def region(self, size: int) -> memoryview:
        """Where the next `size` bytes go; call filled(size) once they are there."""
        if self._fd is None and self.size + size <= self.spill_at:
            self._reserve(self.size + size)
            return memoryview(self._memory)[self.size : self.size + size]
        if self._scratch is None or len(self._scratch) < size:
            self._scratch = bytearray(size)
        return memoryview(self._scratch)[:size]

    def filled(self, size: int) -> None:
        if self._fd is None and self.size + size <= self.spill_at:
            self.size += size
            return
        self.size += size
        if self.error is not None:
            return  # keep counting, stop writing: the answer will be Out of Resources
        try:
            if self._fd is None:
                self._spill(self.size - size)
            assert self._scratch is not None
            _write_all(self._fd, memoryview(self._scratch)[:size])  # type: ignore[arg-type]
        except OSError as exc:
            self.error = exc

    def _reserve(self, capacity: int) -> None:
        if len(self._memory) >= capacity:
            return
        grown = max(capacity, min(2 * len(self._memory), self.spill_at))
        try:
            self._memory.extend(bytes(grown - len(self._memory)))
        except BufferError:
            # A view of the last dataset is still alive somewhere: leave that buffer to it.
            kept = memoryview(self._memory)[: self.size].tobytes()
            self._memory = bytearray(grown)
            self._memory[: self.size] = kept

    def _spill(self, in_memory: int) -> None:
        fd, name = tempfile.mkstemp(prefix="arriving-", dir=self.folder)
        self._fd, self._path = fd, Path(name)
        _write_all(fd, memoryview(self._memory)[:in_memory])

    @contextmanager
    def contents(self) -> Iterator[tuple[bytes | memoryview, FileRegion | None]]:
        """The dataset bytes, and where they are on disk if they spilled; raises ReceiveFailed.

        A spilled dataset is mapped, not read: the header checks touch only the
        pages they parse, and the spool copies the rest in the kernel.
        """
        if self.error is not None:
            raise ReceiveFailed(self.error.errno, _explain(self.error))
        if self._fd is None or self._path is None:
            view = memoryview(self._memory)[: self.size]
            try:
                yield view, None
            finally:
                view.release()
            return
        if self.size == 0:
            yield b"", None
            return
        mapped = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped)
        try:
            yield view, FileRegion(self._path, 0, self.size)
        finally:
            view.release()
            with contextlib.suppress(BufferError):  # a view still held elsewhere: the GC closes it
                mapped.close()

    def discard(self) -> None:
        """Delete the spill file (the spool has its own copy by now); the buffer is kept."""
        self._scratch = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _explain(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (free space on the spool's filesystem)"
    return error.strerror or str(error)
