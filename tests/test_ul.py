"""The sans-I/O Upper Layer codec (node.net.ul) on its own: bytes in, events out, no socket.

The acceptor and the requestor are tested against real peers elsewhere; here the
codec is fed byte streams whole and one byte at a time (which must give the same
messages), and malformed streams, which must fail with the PDUError reasons the
acceptor sent in its A-ABORT before the codec was shared.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.net import dimse, pdu, ul
from node.net.pduguard import ReceiveLimitExceeded, ReceiveLimits

VERIFICATION = dimse.VERIFICATION
CONTEXTS = [(CTImageStorage, ExplicitVRLittleEndian), (VERIFICATION, ExplicitVRLittleEndian)]
CT_CONTEXT, ECHO_CONTEXT = 1, 3
IMPLEMENTATION = ("1.2.3.4", "TEST")


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF of (context ID, message control header, value) PDVs."""
    body = b"".join(pdu.PDV_HEADER.pack(len(v) + 2, cid, control) + v for cid, control, v in pdvs)
    return pdu.encode_pdu(pdu.P_DATA_TF, body)


def store_command() -> bytes:
    return dimse.encode_store_request(7, CTImageStorage, generate_uid())


def echo_command() -> bytes:
    return dimse.encode_echo_request(8, VERIFICATION)


DATASET = bytes(range(256)) * 40  # 10 KiB


def requestor_stream() -> bytes:
    """What an acceptor reads from a requestor: a C-STORE in pieces, a C-ECHO, A-RELEASE-RQ."""
    command = store_command()
    return b"".join(
        (
            pdu.encode_associate_rq("DICOMNODE", "SCU", CONTEXTS, 16384, IMPLEMENTATION),
            p_data((CT_CONTEXT, 0x01, command[:20]), (CT_CONTEXT, 0x03, command[20:])),
            p_data((CT_CONTEXT, 0x00, DATASET[:4000])),
            p_data((CT_CONTEXT, 0x00, DATASET[4000:9000]), (CT_CONTEXT, 0x02, DATASET[9000:])),
            p_data((ECHO_CONTEXT, 0x03, echo_command())),
            pdu.encode_release_rq(),
        )
    )


def acceptor(limits: ReceiveLimits | None = None) -> ul.UpperLayer:
    return ul.UpperLayer(ul.Role.ACCEPTOR, (limits or ReceiveLimits()).pdu_limit)


def accept_all(layer: ul.UpperLayer, request: pdu.AssociateRequest) -> None:
    results = [
        pdu.ContextResult(int(c.context_id or 0), 0, ExplicitVRLittleEndian)
        for c in request.contexts
    ]
    layer.associate_ac(request, results, 16384, IMPLEMENTATION)


def expects_dataset(event: ul.CommandReceived) -> bool:
    return not event.amid_dataset and dimse.decode_command(event.command_set).has_dataset


def acceptor_events(pieces: Iterable[bytes]) -> list[object]:
    """Feed the pieces in order; act as the acceptor does (accept, expect data sets)."""
    layer = acceptor()
    events: list[object] = []
    for piece in pieces:
        layer.receive_data(piece)
        while not isinstance(event := layer.next_event(), ul.NeedData):
            events.append(event)
            if isinstance(event, ul.AssociateRequested):
                accept_all(layer, event.request)
            elif isinstance(event, ul.CommandReceived) and expects_dataset(event):
                layer.expect_dataset(event.context_id)
    return events


def messages(events: list[object]) -> list[object]:
    """Events with each data set's fragments joined: how many fragments depends on the reads."""
    joined: list[object] = []
    for event in events:
        if isinstance(event, ul.DatasetFragment):
            assert event.data is not None
            previous = joined[-1] if joined else None
            if isinstance(previous, tuple) and previous[0] == "dataset" and not previous[3]:
                joined[-1] = ("dataset", event.context_id, previous[2] + event.data, event.last)
            else:
                joined.append(("dataset", event.context_id, event.data, event.last))
        elif isinstance(event, ul.AssociateRequested):
            request = event.request
            joined.append(("request", request.calling_ae_title, request.called_ae_title))
        else:
            joined.append(event)
    return joined


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def test_one_byte_at_a_time_gives_the_same_messages_as_one_piece() -> None:
    stream = requestor_stream()
    whole = messages(acceptor_events([stream]))
    trickled = messages(acceptor_events(one_byte_at_a_time(stream)))
    assert whole == trickled
    kinds = [type(e).__name__ if not isinstance(e, tuple) else e[0] for e in whole]
    assert kinds == ["request", "CommandReceived", "dataset", "CommandReceived", "ReleaseRequested"]
    assert whole[0] == ("request", "SCU", "DICOMNODE")
    store = whole[1]
    assert isinstance(store, ul.CommandReceived) and store.context_id == CT_CONTEXT
    assert dimse.decode_command(store.command_set).command_field == dimse.C_STORE_RQ
    assert whole[2] == ("dataset", CT_CONTEXT, DATASET, True)
    assert whole[3] == ul.CommandReceived(ECHO_CONTEXT, echo_command())


def test_a_driver_can_take_the_data_set_bytes_itself() -> None:
    """The acceptor's zero-copy path: payload_due() says how many bytes are the data set's,
    the driver reads them into its own buffer and reports them; the codec never holds them."""
    stream = requestor_stream()
    layer = acceptor()
    offset, received, fragments = 0, bytearray(), []
    while offset < len(stream):
        event = layer.next_event()
        if isinstance(event, ul.AssociateRequested):
            accept_all(layer, event.request)
        elif isinstance(event, ul.CommandReceived):
            if dimse.decode_command(event.command_set).has_dataset:
                layer.expect_dataset(event.context_id)
        elif isinstance(event, ul.DatasetFragment):
            fragments.append(event)
        elif isinstance(event, ul.NeedData):
            if due := layer.payload_due():
                received += stream[offset : offset + due]
                offset += due
                fragments.append(layer.payload_received(due))
            else:
                wanted = layer.bytes_wanted()
                layer.receive_data(stream[offset : offset + wanted])
                offset += wanted
    assert bytes(received) == DATASET
    assert [(f.size, f.last, f.data) for f in fragments] == [
        (4000, False, None),
        (5000, False, None),
        (len(DATASET) - 9000, True, None),
    ]


def test_the_requestor_side_reads_acceptance_responses_and_the_release_reply() -> None:
    response = dimse.encode_response(dimse.decode_command(echo_command()), 0x0000)
    ac_body = pdu.encode_associate_ac(
        pdu.AssociateRequest("SCU", "DICOMNODE", [], 0, b"DICOMNODE".ljust(16), b"SCU".ljust(16)),
        [pdu.ContextResult(1, 0, ExplicitVRLittleEndian), pdu.ContextResult(3, 3, "1.2")],
        32768,
        "1.2.3",
        "PEER",
    )
    stream = (
        ac_body
        + p_data((1, 0x01, response[:10]))
        + p_data((1, 0x03, response[10:]))
        + pdu.encode_release_rp()
    )

    def events(pieces: Iterable[bytes]) -> list[object]:
        layer = ul.UpperLayer(ul.Role.REQUESTOR)
        found: list[object] = []
        for piece in pieces:
            layer.receive_data(piece)
            while not isinstance(event := layer.next_event(), ul.NeedData):
                found.append(event)
        return found

    whole = events([stream])
    assert whole == events(one_byte_at_a_time(stream))
    assert whole == [
        ul.AssociateAccepted(pdu.Acceptance({1: ExplicitVRLittleEndian}, 32768)),
        ul.CommandReceived(1, response),
        ul.ReleaseReplied(),
    ]


def test_a_rejection_and_an_abort_are_events_that_say_why() -> None:
    layer = ul.UpperLayer(ul.Role.REQUESTOR)
    layer.receive_data(pdu.encode_associate_rj(1, 1, 3))
    rejected = layer.next_event()
    assert rejected == ul.AssociateRejected(1, 1, 3)
    assert isinstance(rejected, ul.AssociateRejected)
    assert rejected.describe() == "permanent, service user: calling AE title not recognised"
    layer = ul.UpperLayer(ul.Role.REQUESTOR)
    layer.receive_data(pdu.encode_abort(pdu.SERVICE_PROVIDER, pdu.UNEXPECTED_PDU))
    assert layer.next_event() == ul.Aborted(pdu.SERVICE_PROVIDER, pdu.UNEXPECTED_PDU)


def established() -> bytes:
    return pdu.encode_associate_rq("DICOMNODE", "SCU", CONTEXTS, 16384, IMPLEMENTATION)


def established_acceptor(limits: ReceiveLimits | None = None) -> ul.UpperLayer:
    """An acceptor's codec past the A-ASSOCIATE-AC, every proposed context accepted."""
    layer = acceptor(limits)
    layer.receive_data(established())
    event = layer.next_event()
    assert isinstance(event, ul.AssociateRequested)
    accept_all(layer, event.request)
    return layer


def pdv_header_only(item_length: int, context_id: int = CT_CONTEXT) -> bytes:
    body = pdu.PDV_HEADER.pack(item_length, context_id, 0x03)
    return pdu.encode_pdu(pdu.P_DATA_TF, body)


STORE_STARTED = p_data((CT_CONTEXT, 0x03, dimse.encode_store_request(7, CTImageStorage, "1.2.3")))

# The messages and A-ABORT reasons the acceptor gave before the codec was shared
# (node/net/association.py and pdu.py at the layout move).
MALFORMED = {
    "unknown PDU type": (b"\x09\x00" + bytes(4), "unknown PDU type 0x09", pdu.UNRECOGNIZED_PDU),
    "first PDU not a request": (
        p_data((CT_CONTEXT, 0x03, b"")),
        "expected an A-ASSOCIATE-RQ, got PDU type 0x04",
        pdu.UNEXPECTED_PDU,
    ),
    "short request": (
        pdu.encode_pdu(pdu.A_ASSOCIATE_RQ, bytes(20)),
        "A-ASSOCIATE-RQ shorter than its fixed fields",
        pdu.INVALID_PDU_PARAMETER,
    ),
    "P-DATA-TF ends in a PDV header": (
        established() + pdu.encode_pdu(pdu.P_DATA_TF, bytes(4)),
        "a P-DATA-TF ends inside a PDV header",
        pdu.INVALID_PDU_PARAMETER,
    ),
    "PDV longer than its PDU": (
        established() + pdv_header_only(90),
        "a PDV claims 90 bytes",
        pdu.INVALID_PDU_PARAMETER,
    ),
    "PDV shorter than its header": (
        established() + pdu.encode_pdu(pdu.P_DATA_TF, pdu.PDV_HEADER.pack(1, 1, 3) + b"\0"),
        "a PDV claims 1 bytes",
        pdu.INVALID_PDU_PARAMETER,
    ),
    "context not accepted": (
        established() + p_data((7, 0x03, b"")),
        "a PDV on presentation context 7, which was not accepted",
        pdu.REASON_NOT_SPECIFIED,
    ),
    "data set without a command": (
        established() + p_data((CT_CONTEXT, 0x02, b"abcd")),
        "a dataset fragment arrived without a command",
        pdu.REASON_NOT_SPECIFIED,
    ),
    "data set on another context": (
        established() + STORE_STARTED + p_data((ECHO_CONTEXT, 0x02, b"abcd")),
        "a dataset fragment on another presentation context than its command",
        pdu.REASON_NOT_SPECIFIED,
    ),
    "a command in pieces amid a data set": (
        established() + STORE_STARTED + p_data((CT_CONTEXT, 0x01, b"abcd")),
        "a new command began before the last one's dataset ended",
        pdu.REASON_NOT_SPECIFIED,
    ),
    "a command set over 64 KiB": (
        established() + p_data(*[(CT_CONTEXT, 0x01, bytes(16000))] * 5),
        "a command set over 64 KiB",
        pdu.REASON_NOT_SPECIFIED,
    ),
    "a second association request": (
        established() + established(),
        "unexpected PDU type 0x01",
        pdu.UNEXPECTED_PDU,
    ),
    "a release reply to an acceptor": (
        established() + pdu.encode_release_rp(),
        "unexpected PDU type 0x06",
        pdu.UNEXPECTED_PDU,
    ),
}


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_streams_fail_with_the_reasons_the_acceptor_always_gave(
    case: str, trickle: bool
) -> None:
    stream, message, reason = MALFORMED[case]
    pieces = one_byte_at_a_time(stream) if trickle else [stream]
    with pytest.raises(pdu.PDUError) as raised:
        acceptor_events(pieces)
    assert str(raised.value) == message
    assert raised.value.reason == reason


def test_a_pdu_over_the_limit_is_refused_from_its_header() -> None:
    layer = established_acceptor(ReceiveLimits(max_pdu=16384))
    layer.receive_data(struct.pack(">BxL", pdu.P_DATA_TF, 16384 + 1025))
    with pytest.raises(ReceiveLimitExceeded, match="claims 17409 bytes"):
        layer.next_event()


@pytest.mark.parametrize(
    ("cut", "between", "message"),
    [
        (0, True, "between PDUs, without A-RELEASE"),
        (3, False, "inside a PDU header, after 3 of its 6 bytes"),
        (8, False, "in the middle of a PDU, 2 bytes early"),
    ],
)
def test_a_closed_connection_says_where_it_was_cut(cut: int, between: bool, message: str) -> None:
    release = pdu.encode_release_rq()
    layer = established_acceptor()
    layer.receive_data(release[:cut])
    layer.receive_data(b"")
    with pytest.raises(ul.ConnectionClosed, match=message) as raised:
        layer.next_event()
    assert raised.value.between_pdus is between


def test_a_cancel_amid_a_data_set_comes_out_and_the_data_set_goes_on() -> None:
    cancel = struct.pack("<HHL", 0, 0x0100, 2) + struct.pack("<H", dimse.C_CANCEL_RQ)
    stream = (
        established()
        + STORE_STARTED
        + p_data((CT_CONTEXT, 0x00, b"ab"))
        + p_data((CT_CONTEXT, 0x03, cancel))
        + p_data((CT_CONTEXT, 0x02, b"cd"))
    )
    found = messages(acceptor_events([stream]))
    assert found[2:] == [
        ("dataset", CT_CONTEXT, b"ab", False),
        ul.CommandReceived(CT_CONTEXT, cancel, amid_dataset=True),
        ("dataset", CT_CONTEXT, b"cd", True),
    ]


def test_a_data_set_goes_out_behind_a_header_the_codec_writes() -> None:
    buffer = bytearray(ul.DATASET_PDU_OVERHEAD + 4)
    buffer[ul.DATASET_PDU_OVERHEAD :] = b"wxyz"
    ul.UpperLayer.dataset_pdu_header(memoryview(buffer), 5, 4, last=True)
    layer = established_acceptor()
    layer.receive_data(STORE_STARTED)
    command = layer.next_event()
    assert isinstance(command, ul.CommandReceived)
    layer.expect_dataset(CT_CONTEXT)
    buffer[10] = CT_CONTEXT  # the PDV's context ID: 5 is not one of ours
    layer.receive_data(bytes(buffer))
    assert layer.next_event() == ul.DatasetFragment(CT_CONTEXT, 4, True, b"wxyz")


def test_a_driver_reading_payload_itself_learns_where_the_connection_was_cut() -> None:
    layer = established_acceptor()
    layer.receive_data(STORE_STARTED)
    assert isinstance(layer.next_event(), ul.CommandReceived)
    layer.expect_dataset(CT_CONTEXT)
    layer.receive_data(p_data((CT_CONTEXT, 0x02, bytes(100)))[:12])  # headers, no payload
    assert layer.next_event() is ul.NEED_DATA
    assert layer.payload_due() == 100
    assert layer.payload_received(30) == ul.DatasetFragment(CT_CONTEXT, 30, False)
    lost = layer.connection_lost()
    assert str(lost) == "the connection closed in the middle of a PDU, 70 bytes early"
    assert not lost.between_pdus
