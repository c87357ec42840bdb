"""The Upper Layer as a sans-I/O state machine: bytes in, typed events out; messages in, bytes out.

One codec for both ends of an association, in the style of h11: the acceptor
(node.net.association), the forwarder's requestor and `dicom-node send`
(node.net.storelink) each own their socket and feed what they read to an
UpperLayer; it frames PDUs (PS3.8 9.3), checks that each may come at this point
of the association, splits P-DATA-TF PDUs into PDVs (PS3.8 annex E) and
assembles those into messages (PS3.7 6.3.1): a complete command set, then the
data set as fragments. Nothing here reads a socket, so it can be tested byte
by byte and cannot block.

Data sets are never buffered whole. A driver that wants the bytes in its own
memory (the acceptor reads them straight into an ArrivingDataset) asks
`payload_due()` how many bytes of the current data set PDV come next and
reports them with `payload_received(n)`; bytes fed through `receive_data`
come out as DatasetFragment events carrying them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from node.net import pdu
from node.net.pduguard import ReceiveLimitExceeded

# Message control header bits of a PDV (PS3.8 E.2)
COMMAND, LAST = 0x01, 0x02
MAX_COMMAND_SET = 64 * 1024  # a command set is a few hundred bytes: more is an attack or a bug
# A C-CANCEL-RQ is one PDV of a few dozen bytes; nothing else may interrupt a data set.
MAX_COMMAND_AMID_DATASET = 1024
# P-DATA-TF header plus PDV header in front of each data set fragment we send.
DATASET_PDU_HEADER = struct.Struct(">BxLLBB")
DATASET_PDU_OVERHEAD = DATASET_PDU_HEADER.size


class ConnectionClosed(Exception):
    """The peer closed the connection where the protocol did not allow it.

    `between_pdus` says it closed where a new PDU would have begun: a peer that
    hangs up without A-RELEASE, not one cut off while sending.
    """

    def __init__(self, message: str, between_pdus: bool = False) -> None:
        super().__init__(message)
        self.between_pdus = between_pdus


class Role(Enum):
    ACCEPTOR = auto()
    REQUESTOR = auto()


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()  # next_event(): feed more bytes first


@dataclass(frozen=True)
class AssociateRequested:
    request: pdu.AssociateRequest


@dataclass(frozen=True)
class AssociateAccepted:
    acceptance: pdu.Acceptance


@dataclass(frozen=True)
class AssociateRejected:
    result: int  # 1 permanent, 2 transient; 0: the PDU was too short to say
    source: int
    diagnostic: int

    def describe(self) -> str:
        return pdu.describe_reject(self.result, self.source, self.diagnostic)


@dataclass(slots=True)  # built per PDV: plain slots, 4x cheaper than frozen
class CommandReceived:
    """A whole command set. `amid_dataset`: it came while a data set was arriving (only a
    C-CANCEL-RQ may, PS3.7 9.3.2.3); the data set goes on arriving after it."""

    context_id: int
    command_set: bytes
    amid_dataset: bool = False


@dataclass(slots=True)  # built per PDV: plain slots, 4x cheaper than frozen
class DatasetFragment:
    """Some data set bytes; `data` is None when the driver read them itself (payload_received)."""

    context_id: int
    size: int
    last: bool  # the data set is complete
    data: bytes | None = None


@dataclass(frozen=True)
class ReleaseRequested:
    pass


@dataclass(frozen=True)
class ReleaseReplied:
    pass


@dataclass(frozen=True)
class Aborted:
    source: int
    reason: int


Event = (
    AssociateRequested
    | AssociateAccepted
    | AssociateRejected
    | CommandReceived
    | DatasetFragment
    | ReleaseRequested
    | ReleaseReplied
    | Aborted
)


class _Step(Enum):
    PDU_HEADER = auto()
    PDU_BODY = auto()  # any PDU but P-DATA-TF, read whole (they are small)
    PDV_HEADER = auto()
    COMMAND_VALUE = auto()
    DATASET_VALUE = auto()


_PDU_HEADER, _PDU_BODY, _PDV_HEADER = _Step.PDU_HEADER, _Step.PDU_BODY, _Step.PDV_HEADER
_COMMAND_VALUE, _DATASET_VALUE = _Step.COMMAND_VALUE, _Step.DATASET_VALUE


# Which PDUs each end may receive, before and after the association is established.
_EXPECTED = {
    (Role.ACCEPTOR, False): frozenset({pdu.A_ASSOCIATE_RQ}),
    (Role.ACCEPTOR, True): frozenset({pdu.P_DATA_TF, pdu.A_RELEASE_RQ, pdu.A_ABORT}),
    (Role.REQUESTOR, False): frozenset({pdu.A_ASSOCIATE_AC, pdu.A_ASSOCIATE_RJ, pdu.A_ABORT}),
    (Role.REQUESTOR, True): frozenset(
        {pdu.P_DATA_TF, pdu.A_RELEASE_RQ, pdu.A_RELEASE_RP, pdu.A_ABORT}
    ),
}


class UpperLayer:
    """One association's Upper Layer, seen from one end. Not thread-safe: one driver feeds it.

    `pdu_limit(pdu_type)` is the largest PDU length accepted (0: no limit); a PDU header
    claiming more raises ReceiveLimitExceeded before any of its body is read.
    """

    def __init__(self, role: Role, pdu_limit: Callable[[int], int] | None = None) -> None:
        self.role = role
        self.established = False
        self._expected = _EXPECTED[(role, False)]
        self._pdu_limit = pdu_limit or (lambda _pdu_type: 0)
        self._buffer = bytearray()
        self._start = 0  # bytes of _buffer already consumed
        self._eof = False
        self._step = _PDU_HEADER
        self._want = pdu.HEADER.size
        self._header = b""
        self._pdu_type = 0
        self._pdu_left = 0  # of the P-DATA-TF being split
        self._context_id = 0  # of the PDV being read
        self._control = 0
        self._accepted: frozenset[int] = frozenset()  # presentation context IDs
        self._command = bytearray()
        self._dataset_context: int | None = None  # a data set is due on this context

    # --- bytes in ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read from the peer; empty bytes: the peer closed the connection."""
        if not data:
            self._eof = True
            return
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        self._buffer += data

    def bytes_wanted(self) -> int:
        """How many more bytes complete the current step (at least 1 while NEED_DATA)."""
        return max(1, self._want - (len(self._buffer) - self._start))

    def payload_due(self) -> int:
        """Bytes of the current data set PDV that the driver may read into its own memory
        and report with payload_received(); 0 when the next bytes must be fed."""
        if self._step is _DATASET_VALUE and self._start == len(self._buffer):
            return self._want
        return 0

    def payload_received(self, size: int) -> DatasetFragment:
        """The driver read `size` (1..payload_due()) bytes of the data set itself."""
        if not 0 < size <= self._want or self._step is not _DATASET_VALUE:
            raise ValueError(f"{size} bytes reported, {self.payload_due()} due")
        return self._dataset_bytes(size, None)

    def connection_lost(self) -> ConnectionClosed:
        """The driver met the end of the stream while reading payload itself: what to raise."""
        self._eof = True
        return self._closed(len(self._buffer) - self._start)

    @property
    def in_message(self) -> bool:
        """A message has begun and is not complete (the DIMSE timeout applies)."""
        return bool(self._command) or self._dataset_context is not None

    def expect_dataset(self, context_id: int) -> None:
        """The command just received says a data set follows (PS3.7 E.1 Command Data Set Type)."""
        self._dataset_context = context_id

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA. Raises PDUError, ReceiveLimitExceeded or
        ConnectionClosed: the association is over and the codec unusable."""
        while True:  # on the per-message path: plain locals, no helper calls it can spare
            start, want, step = self._start, self._want, self._step
            available = len(self._buffer) - start
            if step is _DATASET_VALUE and (available or not want):
                size = min(available, want)
                self._start = start + size
                return self._dataset_bytes(size, bytes(self._buffer[start : start + size]))
            if available < want:
                if self._eof:
                    raise self._closed(available)
                return NEED_DATA
            data = bytes(self._buffer[start : start + want])
            self._start = start + want
            if step is _PDU_HEADER:
                self._pdu_header(data)
            elif step is _PDV_HEADER:
                self._pdv_header(data)
            elif step is _PDU_BODY:
                self._next_pdu()
                return self._pdu_body(data)
            elif (event := self._command_bytes(data)) is not None:
                return event

    def _closed(self, available: int) -> ConnectionClosed:
        if self._step is _PDU_HEADER:
            if not available:
                return ConnectionClosed(
                    "the peer closed the connection between PDUs, without A-RELEASE",
                    between_pdus=True,
                )
            return ConnectionClosed(
                f"the connection closed inside a PDU header, after {available} of its"
                f" {pdu.HEADER.size} bytes"
            )
        return ConnectionClosed(
            f"the connection closed in the middle of a PDU, {self._want - available} bytes early"
        )

    def _establish(self) -> None:
        self.established = True
        self._expected = _EXPECTED[(self.role, True)]

    def _next_pdu(self) -> None:
        self._step, self._want = _PDU_HEADER, pdu.HEADER.size

    # --- PDUs ---------------------------------------------------------------------------------

    def _pdu_header(self, header: bytes) -> None:
        pdu_type, length = pdu.parse_header(header)
        expected = self._expected
        if pdu_type not in expected and self.role is Role.ACCEPTOR and not self.established:
            raise pdu.PDUError(
                f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}", pdu.UNEXPECTED_PDU
            )
        limit = self._pdu_limit(pdu_type)
        if limit and length > limit:
            raise ReceiveLimitExceeded(
                f"a PDU of type 0x{pdu_type:02X} claims {length} bytes (limit {limit})"
            )
        if pdu_type not in expected:
            raise pdu.PDUError(f"unexpected PDU type 0x{pdu_type:02X}", pdu.UNEXPECTED_PDU)
        self._pdu_type = pdu_type
        if pdu_type == pdu.P_DATA_TF:
            self._pdu_left = length
            self._after_pdv()
        else:
            self._header = header
            self._step, self._want = _PDU_BODY, length

    def _pdu_body(self, body: bytes) -> Event:
        pdu_type = self._pdu_type
        if pdu_type == pdu.A_ASSOCIATE_RQ:
            return AssociateRequested(pdu.decode_associate_rq(self._header + body))
        if pdu_type == pdu.A_ASSOCIATE_AC:
            acceptance = pdu.decode_associate_ac(body)
            self._establish()
            self._accepted = frozenset(acceptance.syntaxes)
            return AssociateAccepted(acceptance)
        if pdu_type == pdu.A_ASSOCIATE_RJ:
            return AssociateRejected(*(body[1:4] if len(body) >= 4 else (0, 0, 0)))
        if pdu_type == pdu.A_RELEASE_RQ:
            return ReleaseRequested()
        if pdu_type == pdu.A_RELEASE_RP:
            return ReleaseReplied()
        return Aborted(*(body[2:4] if len(body) >= 4 else (0, 0)))

    # --- PDVs and messages --------------------------------------------------------------------

    def _after_pdv(self) -> None:
        if not self._pdu_left:
            self._next_pdu()
        elif self._pdu_left < pdu.PDV_HEADER_SIZE:
            raise pdu.PDUError("a P-DATA-TF ends inside a PDV header", pdu.INVALID_PDU_PARAMETER)
        else:
            self._step, self._want = _PDV_HEADER, pdu.PDV_HEADER_SIZE

    def _pdv_header(self, header: bytes) -> None:
        item_length, context_id, control = pdu.PDV_HEADER.unpack(header)
        if item_length < 2 or item_length + 4 > self._pdu_left:
            raise pdu.PDUError(f"a PDV claims {item_length} bytes", pdu.INVALID_PDU_PARAMETER)
        self._pdu_left -= item_length + 4
        if context_id not in self._accepted:
            raise pdu.PDUError(
                f"a PDV on presentation context {context_id}, which was not accepted"
            )
        size = item_length - 2
        self._context_id, self._control = context_id, control
        if control & COMMAND:
            self._check_command_fragment(size, control)
            self._step, self._want = _COMMAND_VALUE, size
            return
        if self._dataset_context is None:
            raise pdu.PDUError("a dataset fragment arrived without a command")
        if context_id != self._dataset_context:
            raise pdu.PDUError(
                "a dataset fragment on another presentation context than its command"
            )
        self._step, self._want = _DATASET_VALUE, size

    def _check_command_fragment(self, size: int, control: int) -> None:
        if self._dataset_context is not None:
            if size > MAX_COMMAND_AMID_DATASET or not control & LAST:
                raise pdu.PDUError("a new command began before the last one's dataset ended")
        elif len(self._command) + size > MAX_COMMAND_SET:
            raise pdu.PDUError("a command set over 64 KiB")

    def _command_bytes(self, data: bytes) -> Event | None:
        self._after_pdv()
        if self._dataset_context is not None:  # whole, checked by _check_command_fragment
            return CommandReceived(self._context_id, data, amid_dataset=True)
        self._command += data
        if not self._control & LAST:
            return None
        command_set = bytes(self._command)
        self._command.clear()
        return CommandReceived(self._context_id, command_set)

    def _dataset_bytes(self, size: int, data: bytes | None) -> DatasetFragment:
        self._want -= size
        last = False
        if not self._want:
            last = bool(self._control & LAST)
            if last:
                self._dataset_context = None
            self._after_pdv()
        return DatasetFragment(self._context_id, size, last, data)

    # --- messages out -------------------------------------------------------------------------
    # The requestor's A-ASSOCIATE-RQ is pdu.encode_associate_rq: nothing changes state until
    # the answer comes.

    def associate_ac(
        self,
        request: pdu.AssociateRequest,
        results: Sequence[pdu.ContextResult],
        max_pdu: int,
        implementation: tuple[str, str],
        user_identity_response: bytes | None = None,
    ) -> bytes:
        """The acceptor's A-ASSOCIATE-AC: from here on PDVs may come on the accepted contexts."""
        self._establish()
        self._accepted = frozenset(r.context_id for r in results if r.result == 0)
        return pdu.encode_associate_ac(
            request, results, max_pdu, *implementation, user_identity_response
        )

    @staticmethod
    def associate_rj(result: int, source: int, diagnostic: int) -> bytes:
        return pdu.encode_associate_rj(result, source, diagnostic)

    @staticmethod
    def command(context_id: int, command_set: bytes) -> bytes:
        return pdu.encode_command_pdu(context_id, command_set)

    @staticmethod
    def dataset_pdu_header(into: memoryview, context_id: int, size: int, last: bool) -> None:
        """Write the DATASET_PDU_OVERHEAD bytes that go before `size` data set bytes into
        the front of `into`: one P-DATA-TF with one PDV, the data set bytes sent as they are."""
        DATASET_PDU_HEADER.pack_into(
            into, 0, pdu.P_DATA_TF, size + 6, size + 2, context_id, LAST if last else 0
        )

    @staticmethod
    def release_rq() -> bytes:
        return pdu.encode_release_rq()

    @staticmethod
    def release_rp() -> bytes:
        return pdu.encode_release_rp()

    @staticmethod
    def abort(source: int = pdu.SERVICE_PROVIDER, reason: int = pdu.REASON_NOT_SPECIFIED) -> bytes:
        return pdu.encode_abort(source, reason)


def receive_event(layer: UpperLayer, read: Callable[[int], bytes]) -> Event:
    """The next event, feeding `layer` with `read(n)` (b"" at end of stream) as it needs."""
    while True:
        event = layer.next_event()
        if not isinstance(event, NeedData):
            return event
        layer.receive_data(read(layer.bytes_wanted()))
