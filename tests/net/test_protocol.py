"""The node's own PDU and DIMSE codecs, checked against pydicom's and pynetdicom's encoders."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from node.net import dimse, pdu


def command_bytes(ds: Dataset) -> bytes:
    # pynetdicom's own command set encoder, as its SCU sends it.
    encoded = encode(ds, True, True)
    assert encoded is not None
    return encoded


def store_request() -> Dataset:
    ds = Dataset()
    ds.CommandGroupLength = 0
    ds.AffectedSOPClassUID = CTImageStorage
    ds.CommandField = 0x0001
    ds.MessageID = 7
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000
    ds.AffectedSOPInstanceUID = "1.2.3.4.5"
    ds.MoveOriginatorApplicationEntityTitle = "MOVER"
    return ds


def test_a_c_store_request_encoded_by_pydicom_is_decoded() -> None:
    command = dimse.decode_command(command_bytes(store_request()))
    assert command == dimse.Command(
        command_field=dimse.C_STORE_RQ,
        message_id=7,
        has_dataset=True,
        affected_sop_class_uid=CTImageStorage,
        affected_sop_instance_uid="1.2.3.4.5",
        move_originator_ae_title="MOVER",
    )


def test_a_c_store_response_reads_back_with_pydicom() -> None:
    request = dimse.decode_command(command_bytes(store_request()))
    encoded = dimse.encode_response(request, 0xA700, "the disk is full" + "!" * 80)
    ds = read_dataset(BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(encoded) - 12
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 7
    assert ds.CommandDataSetType == 0x0101
    assert ds.Status == 0xA700
    assert ds.AffectedSOPClassUID == CTImageStorage
    assert ds.AffectedSOPInstanceUID == "1.2.3.4.5"
    assert ds.ErrorComment.startswith("the disk is full") and len(ds.ErrorComment) <= 64


def test_an_error_comment_is_one_lo_value_even_with_a_backslash_in_the_reason() -> None:
    # A Windows path in a reason would otherwise split (0000,0902) into several values.
    encoded = dimse.encode_response(
        dimse.decode_command(command_bytes(store_request())), 0xC210, r"cannot read C:\spool\x"
    )
    response = read_dataset(BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)
    assert response["ErrorComment"].VM == 1
    assert response.ErrorComment == "cannot read C:/spool/x"


def test_a_success_carries_no_error_comment() -> None:
    request = dimse.decode_command(command_bytes(store_request()))
    ds = read_dataset(
        BytesIO(dimse.encode_response(request, 0x0000, "ignored")),
        is_implicit_VR=True,
        is_little_endian=True,
    )
    assert ds.Status == 0 and "ErrorComment" not in ds


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-3],  # ends inside an element
        lambda b: b"\x08\x00" + b[2:],  # not group 0000
        lambda b: b[:4] + b"\xff\xff\xff\x7f" + b[8:],  # a length past the end
    ],
)
def test_a_damaged_command_set_is_a_command_error(damage) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(dimse.CommandError):
        dimse.decode_command(damage(command_bytes(store_request())))


def test_a_command_without_a_message_id_is_a_command_error() -> None:
    ds = store_request()
    del ds.MessageID
    with pytest.raises(dimse.CommandError, match="0110"):
        dimse.decode_command(command_bytes(ds))


def associate_rq_bytes() -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "MODALITY"
    primitive.called_ae_title = "DICOMNODE"
    context = build_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3"
    primitive.user_information = [max_length, implementation]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return request.encode()


def test_an_associate_request_is_decoded_and_the_accept_reads_back_with_pynetdicom() -> None:
    request = pdu.decode_associate_rq(associate_rq_bytes())
    assert (request.calling_ae_title, request.called_ae_title) == ("MODALITY", "DICOMNODE")
    assert request.max_pdu == 16384
    assert [cx.abstract_syntax for cx in request.contexts] == [CTImageStorage]

    results = [pdu.ContextResult(1, 0, ExplicitVRLittleEndian), pdu.ContextResult(3, 3, "1.2")]
    encoded = pdu.encode_associate_ac(
        request, results, 262144, "1.2.826.0.1.3680043", "DICOMNODE_1"
    )
    accept = A_ASSOCIATE_AC()
    accept.decode(encoded)
    primitive = accept.to_primitive()
    contexts = primitive.presentation_context_definition_results_list
    assert [(cx.context_id, cx.result) for cx in contexts] == [(1, 0), (3, 3)]
    assert contexts[0].transfer_syntax == [ExplicitVRLittleEndian]
    assert primitive.maximum_length_received == 262144
    assert primitive.implementation_class_uid == "1.2.826.0.1.3680043"
    assert primitive.called_ae_title == "DICOMNODE"


@pytest.mark.parametrize("length", [0, 10, 73])
def test_a_short_associate_request_is_a_pdu_error(length: int) -> None:
    with pytest.raises(pdu.PDUError):
        pdu.decode_associate_rq(associate_rq_bytes()[:length])


def test_an_unknown_pdu_type_is_refused_by_its_header() -> None:
    with pytest.raises(pdu.PDUError, match="0x09"):
        pdu.parse_header(b"\x09\x00\x00\x00\x00\x04")
    assert pdu.parse_header(b"\x04\x00\x00\x01\x00\x00") == (pdu.P_DATA_TF, 65536)


def test_the_command_pdu_frames_one_last_command_fragment() -> None:
    encoded = pdu.encode_command_pdu(5, b"abcd")
    assert encoded == b"\x04\x00\x00\x00\x00\x0a" + b"\x00\x00\x00\x06\x05\x03abcd"


def test_a_c_store_request_we_send_reads_back_with_pydicom() -> None:
    encoded = dimse.encode_store_request(9, CTImageStorage, "1.2.3.45")  # odd: padded
    ds = read_dataset(BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(encoded) - 12
    assert (ds.CommandField, ds.MessageID, ds.Priority, ds.CommandDataSetType) == (1, 9, 0, 0)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == (CTImageStorage, "1.2.3.45")
    assert dimse.decode_command(encoded).has_dataset


def proposal(*contexts: tuple[str, list[str]]) -> pdu.AssociateRequest:
    built = []
    for index, (abstract, syntaxes) in enumerate(contexts):
        context = build_context(abstract, syntaxes)
        context.context_id = 2 * index + 1
        built.append(context)
    return pdu.AssociateRequest("SCU", "DICOMNODE", built, 0, b" " * 16, b" " * 16)


def test_negotiation_prefers_our_order_and_refuses_what_is_not_storage() -> None:
    from pydicom.uid import JPEGLSLossless

    from node.ingest.scp import StorageNegotiation

    negotiate = StorageNegotiation([JPEGLSLossless, ExplicitVRLittleEndian])
    request = proposal(
        (CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGLSLossless]),
        ("1.2.840.10008.5.1.4.1.2.1.1", [ImplicitVRLittleEndian]),  # C-FIND: not ours
        ("1.2.840.10008.1.1", [ExplicitVRLittleEndian]),  # Verification
        ("1.2.3.4.5.6.7", [ExplicitVRLittleEndian]),  # private SOP class: stored too
        (CTImageStorage, [ImplicitVRLittleEndian]),  # no syntax we accept
    )
    for _ in range(2):  # the second answer comes from what the first one remembered
        results = negotiate(request)
        assert [(r.context_id, r.result, r.transfer_syntax) for r in results] == [
            (1, 0, JPEGLSLossless),
            (3, 3, ImplicitVRLittleEndian),
            (5, 0, ExplicitVRLittleEndian),
            (7, 0, ExplicitVRLittleEndian),
            (9, 4, ImplicitVRLittleEndian),
        ]
