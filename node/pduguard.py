"""Receive-side limits on what a peer may make the node hold in memory.

pynetdicom reads a whole PDU into memory, whatever length its header claims,
and collects all the P-DATA fragments of a C-STORE before the handler sees
the dataset. A hostile or broken peer could therefore send gigabytes for one
message. PDUWatch sits on the association's socket reads and cuts the
connection (pynetdicom then aborts the association) when:
- a P-DATA-TF PDU is longer than the maximum PDU length we advertised
  (node.max_pdu; PS3.8 D.1), or any other PDU is over 1 MiB;
- the dataset fragments of one message exceed twice limits.max_instance_size.
Between the limit and twice the limit, the instance is received and refused
with 0xA700 by intake, which tells an honest sender why.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("node.pduguard")

P_DATA_TF = 0x04
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
OTHER_PDU_LIMIT = 1024 * 1024
# Peers round differently around the advertised maximum; a little slack costs nothing.
PDU_SLACK = 1024


class ReceiveLimitExceeded(OSError):
    """The peer sent more than the node accepts; the connection is dropped."""


@dataclass
class ReceiveLimits:
    max_pdu: int = 0  # node.max_pdu: 0 is unlimited
    max_instance_size: int = 0  # limits.max_instance_size: 0 is unlimited

    def pdu_limit(self, pdu_type: int) -> int:
        if pdu_type != P_DATA_TF:
            return OTHER_PDU_LIMIT
        if self.max_pdu:
            return self.max_pdu + PDU_SLACK
        return self.message_limit()

    def message_limit(self) -> int:
        return 2 * self.max_instance_size if self.max_instance_size else 0


class PDUWatch:
    """Wraps AssociationSocket.recv: pynetdicom reads a 6-byte PDU header, then its body."""

    def __init__(self, recv: Callable[[int], bytearray], limits: ReceiveLimits, peer: str) -> None:
        self.recv = recv
        self.limits = limits
        self.peer = peer
        self.pending_type: int | None = None
        self.message_bytes = 0

    def __call__(self, nr_bytes: int) -> bytearray:
        if self.pending_type is None:
            data = self.recv(nr_bytes)
            if nr_bytes == 6 and len(data) == 6:
                pdu_type, _, length = struct.unpack(">BBL", data)
                if pdu_type not in KNOWN_PDU_TYPES:
                    return data  # pynetdicom aborts without reading a body
                self._check_pdu(pdu_type, length)
                self.pending_type = pdu_type
            return data
        pdu_type, self.pending_type = self.pending_type, None
        data = self.recv(nr_bytes)
        if pdu_type == P_DATA_TF:
            self._count_fragments(data)
        return data

    def _check_pdu(self, pdu_type: int, length: int) -> None:
        limit = self.limits.pdu_limit(pdu_type)
        if limit and length > limit:
            self._refuse(f"a PDU of type 0x{pdu_type:02X} claims {length} bytes (limit {limit})")

    def _count_fragments(self, body: bytearray) -> None:
        offset = 0
        while offset + 6 <= len(body):
            (item_length,) = struct.unpack_from(">L", body, offset)
            control = body[offset + 5]
            if not control & 0x01:  # a dataset fragment, not a command
                self.message_bytes += max(0, item_length - 2)
                limit = self.limits.message_limit()
                if limit and self.message_bytes > limit:
                    self._refuse(
                        f"a dataset passed {self.message_bytes} bytes"
                        f" (twice limits.max_instance_size: {limit})"
                    )
                if control & 0x02:  # last fragment of the dataset
                    self.message_bytes = 0
            offset += 4 + item_length

    def _refuse(self, why: str) -> None:
        log.warning("dropping the connection from %s: %s", self.peer, why)
        raise ReceiveLimitExceeded(why)


def watch(assoc_socket: object, limits: ReceiveLimits, peer: str) -> None:
    """Put a PDUWatch on a pynetdicom AssociationSocket's reads."""
    recv = assoc_socket.recv  # type: ignore[attr-defined]
    assoc_socket.recv = PDUWatch(recv, limits, peer)  # type: ignore[attr-defined]
