"""Socket reads for pynetdicom without its 4 KiB-at-a-time loop.

pynetdicom 3.0 reads every PDU with recv(4096) calls, each result appended to
a growing bytearray: a 2 MB MR instance costs 512 Python-level recv calls and
as many reallocations, which the profile showed as the largest share of the
DUL thread. Reading straight into one buffer of the PDU's size does the same
work with a handful of system calls. Behaviour is otherwise identical: a
closed connection returns the bytes read so far.
"""

from __future__ import annotations

from pynetdicom.transport import AssociationSocket

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
