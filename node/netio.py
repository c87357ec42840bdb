"""How the SCP gets bytes from pynetdicom: faster socket reads, large datasets kept on disk.

Socket reads without pynetdicom's 4 KiB-at-a-time loop:

pynetdicom 3.0 reads every PDU with recv(4096) calls, each result appended to
a growing bytearray: a 2 MB MR instance costs 512 Python-level recv calls and
as many reallocations, which the profile showed as the largest share of the
DUL thread. Reading straight into one buffer of the PDU's size does the same
work with a handful of system calls. Behaviour is otherwise identical: a
closed connection returns the bytes read so far.

Datasets received to disk: by default pynetdicom collects a C-STORE dataset
in memory, so a 1 GiB multi-frame instance costs 1 GiB (or more) of RAM per
association. With STORE_RECV_CHUNKED_DATASET it appends each fragment to a
file instead; intake maps that file and the spool copies from it in the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pynetdicom import Association, _config, dimse_messages
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import AssociationSocket

from node.durable import FileRegion
from node.spool import PREAMBLE

_installed = False


def recv_exactly(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read nr_bytes from the association's socket (fewer only if the peer closed it)."""
    buffer = bytearray(nr_bytes)
    read = _fill(self.socket, buffer)  # type: ignore[arg-type]
    return buffer if read == nr_bytes else buffer[:read]


def _fill(sock: object, buffer: bytearray) -> int:
    view = memoryview(buffer)
    read = 0
    try:
        while read < len(buffer):
            count = sock.recv_into(view[read:])  # type: ignore[attr-defined]
            if not count:
                break
            read += count
    finally:
        view.release()  # so the caller may slice or resize the buffer
    return read


def install_fast_reads() -> None:
    """Replace AssociationSocket.recv for every association in this process (idempotent)."""
    global _installed
    if not _installed:
        AssociationSocket.recv = recv_exactly  # type: ignore[method-assign]
        _installed = True


def receive_to_disk(folder: Path) -> None:
    """Have pynetdicom write each received C-STORE dataset to a file in folder, not to memory.

    The folder lives beside the spool, on the disk the free-space check watches
    (a tmpfs /tmp would hold a 2 GB instance in RAM). Files left by a crash were
    never acknowledged and are removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob("tmp*"):
        leftover.unlink(missing_ok=True)
    ReceivingFile.folder = folder
    dimse_messages.NamedTemporaryFile = ReceivingFile  # type: ignore[attr-defined]
    _config.STORE_RECV_CHUNKED_DATASET = True


class ReceiveFailed(OSError):
    """The dataset could not be written to disk while it arrived (a full disk, usually)."""


class ReceivingFile:
    """pynetdicom's file for an arriving dataset, remembering a failed write instead of raising.

    An error raised inside pynetdicom's reactor aborts the association; remembered,
    it lets the C-STORE handler answer Out of Resources, as for a failed spool write.
    pynetdicom uses write(), file.flush(), close() and name; it deletes the file itself.
    """

    folder: Path | None = None  # None: the system's temporary folder

    def __init__(self, *args: object, **kwargs: object) -> None:
        # Not tempfile.tempdir: that would move every temporary file of the process
        # (the codec pool's forkserver socket among them).
        kwargs.setdefault("dir", self.folder)
        self._file = tempfile.NamedTemporaryFile(*args, **kwargs)  # type: ignore[call-overload]  # noqa: SIM115
        self.name: str = self._file.name
        self.file = self
        self.error: OSError | None = None

    def write(self, data: bytes | memoryview) -> int:
        self._attempt(self._file.write, data)
        return len(data)

    def flush(self) -> None:
        self._attempt(self._file.flush)

    def close(self) -> None:
        self._attempt(self._file.close)

    def _attempt(self, operation: Callable[..., object], *args: object) -> None:
        if self.error is not None and operation != self._file.close:
            return
        try:
            operation(*args)
        except OSError as exc:
            self.error = self.error or exc


@contextmanager
def received_dataset(request: C_STORE) -> Iterator[tuple[bytes | memoryview, FileRegion | None]]:
    """The dataset bytes of a C-STORE request, and where they are on disk if they are.

    A dataset received to disk is mapped, not read: the header checks touch only
    the pages they parse, and the spool copies the rest in the kernel.
    """
    path = getattr(request, "_dataset_path", None)
    if path is None:
        yield request.DataSet.getbuffer(), None
        return
    receiving = getattr(request, "_dataset_file", None)
    if isinstance(receiving, ReceivingFile) and receiving.error is not None:
        raise ReceiveFailed(receiving.error.errno, _explain(receiving.error))
    with open(path, "rb") as fp:
        mapped = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    try:
        offset = _dataset_offset(view)
        dataset = view[offset:]
        yield dataset, FileRegion(Path(path), offset, len(dataset))
    finally:
        view.release()
        with contextlib.suppress(BufferError):  # a view still held elsewhere: the GC closes it
            mapped.close()


def _explain(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (free space on the spool's filesystem)"
    return error.strerror or str(error)


def _dataset_offset(data: memoryview) -> int:
    """Where the dataset starts in pynetdicom's file: after the preamble and the File Meta group.

    pynetdicom always writes File Meta Information Group Length (0002,0000) UL first.
    """
    start = len(PREAMBLE)
    if bytes(data[:start]) != PREAMBLE or bytes(data[start : start + 6]) != b"\x02\x00\x00\x00UL":
        raise ValueError("pynetdicom's received-dataset file has an unexpected layout")
    (group_length,) = struct.unpack_from("<L", data, start + 8)
    return start + 12 + group_length


def discard_unfinished(assoc: Association) -> None:
    """Delete the file of a dataset whose association ended before it arrived in full.

    pynetdicom deletes a received-dataset file only after the C-STORE handler ran;
    an association aborted mid-dataset would otherwise leave it until restart.
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    receiving = getattr(message, "_data_set_file", None)
    if isinstance(receiving, ReceivingFile):
        receiving.close()
        Path(receiving.name).unlink(missing_ok=True)
