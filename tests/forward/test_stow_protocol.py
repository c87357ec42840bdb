"""STOW-RS without the network (node.forward.stow): the multipart body as a MIME parser
reads it back, both response encodings, and what each answer means per instance."""

from __future__ import annotations

import email.parser
import email.policy
import json
from pathlib import Path

import pytest

from node.forward.stow import (
    BodyChanged,
    MultipartBody,
    ResponseError,
    StoreResponse,
    Verdict,
    parse_response,
    read_answer,
)

WHERE = "http://127.0.0.1:8042/dicom-web/studies"
A, B, C = "1.2.3.1", "1.2.3.2", "1.2.3.3"


def parts_of(body: MultipartBody, chunks: list[bytes]) -> list[bytes]:
    """The parts as the stdlib MIME parser reads them (a parser we did not write)."""
    message = f"Content-Type: {body.content_type}\r\n\r\n".encode() + b"".join(chunks)
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(message)
    assert parsed.get_content_type() == "multipart/related"
    assert parsed.get_param("type") == "application/dicom"
    parts = list(parsed.iter_parts())
    assert all(part.get_content_type() == "application/dicom" for part in parts)
    return [part.get_payload(decode=True) for part in parts]


def test_body_streams_each_file_whole_in_small_chunks(tmp_path: Path) -> None:
    contents = [bytes(range(256)) * 40 + b"\r\n--", b"DICM" * 3, b"\x00" * 5000]
    paths = []
    for index, data in enumerate(contents):
        paths.append(tmp_path / f"{index}.dcm")
        paths[-1].write_bytes(data)
    body = MultipartBody(paths)
    chunks = list(body.chunks(read_size=1000))
    assert len(body) == sum(len(c) for c in chunks)
    assert max(len(c) for c in chunks) <= 1000  # read in chunks, never a whole file
    assert parts_of(body, chunks) == contents


def test_body_refuses_a_file_that_changed_after_measuring(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(b"x" * 100)
    body = MultipartBody([path])
    path.write_bytes(b"x" * 50)
    with pytest.raises(BodyChanged, match="ended 50 bytes early"):
        list(body.chunks())
    path.write_bytes(b"x" * 150)
    with pytest.raises(BodyChanged, match="grew"):
        list(body.chunks())


# As Orthanc 1.10 with DICOMweb plugin 1.7 answers (whitespace trimmed), and one failure.
ORTHANC_JSON = {
    "00080005": {"Value": ["ISO_IR 100"], "vr": "CS"},
    "00081198": {"vr": "SQ"},
    "00081199": {
        "Value": [
            {
                "00081150": {"Value": ["1.2.840.10008.5.1.4.1.1.2"], "vr": "UI"},
                "00081155": {"Value": [A], "vr": "UI"},
            },
            {
                "00081150": {"Value": ["1.2.840.10008.5.1.4.1.1.2"], "vr": "UI"},
                "00081155": {"Value": [B], "vr": "UI"},
                "00081196": {"Value": [0xB000], "vr": "US"},
            },
        ],
        "vr": "SQ",
    },
}
FAILED_JSON = {
    "00081198": {
        "Value": [{"00081155": {"Value": [C], "vr": "UI"}, "00081197": {"Value": [0xA900]}}],
        "vr": "SQ",
    }
}
ORTHANC_XML = f"""<?xml version="1.0" encoding="utf-8"?>
<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
  <DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI" keyword="ReferencedSOPInstanceUID">
        <Value number="1">{C}</Value>
      </DicomAttribute>
      <DicomAttribute tag="00081197" vr="US" keyword="FailureReason">
        <Value number="1">49442</Value>
      </DicomAttribute>
    </Item>
  </DicomAttribute>
  <DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI" keyword="ReferencedSOPInstanceUID">
        <Value number="1">{A}</Value>
      </DicomAttribute>
    </Item>
    <Value number="1" />
  </DicomAttribute>
</NativeDicomModel>
""".encode()


def test_json_and_xml_responses_read_alike() -> None:
    from_json = parse_response("application/dicom+json", json.dumps(ORTHANC_JSON).encode())
    assert from_json == StoreResponse(referenced={A: None, B: 0xB000}, failed={})
    failed = parse_response(
        "application/dicom+json; charset=utf-8", json.dumps([FAILED_JSON]).encode()
    )
    assert failed == StoreResponse(referenced={}, failed={C: 0xA900})
    from_xml = parse_response("application/dicom+xml", ORTHANC_XML)
    assert from_xml == StoreResponse(referenced={A: None}, failed={C: 0xC122})
    assert parse_response("", b"  ") == StoreResponse()


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("application/dicom+json", b"{not json", "not JSON"),
        ("application/dicom+json", b"[1, 2]", "not a DICOM JSON dataset"),
        ("application/dicom+xml", b"<a><b></a>", "not XML"),
        ("text/html", b"<html>oops</html>", "'text/html'"),
    ],
)
def test_an_unreadable_response_says_why(content_type: str, body: bytes, message: str) -> None:
    with pytest.raises(ResponseError, match=message):
        parse_response(content_type, body)


def answer(status: int, data: dict[str, object] | None, sent: list[str]):  # type: ignore[no-untyped-def]
    body = json.dumps(data).encode() if data is not None else b""
    return read_answer(status, "application/dicom+json", body, sent, WHERE)


def verdicts(status: int, data: dict[str, object] | None, sent: list[str]) -> dict[str, str]:
    result = answer(status, data, sent)
    assert result.hold is None
    return {uid: outcome.verdict for uid, outcome in result.outcomes.items()}


def failure(uid: str, reason: int) -> dict[str, object]:
    return {"00081155": {"Value": [uid]}, "00081197": {"Value": [reason]}}


def test_200_delivers_every_instance_listed_or_not() -> None:
    assert verdicts(200, ORTHANC_JSON, [A, B, C]) == {
        A: "delivered",
        B: "delivered",
        C: "delivered",
    }
    outcome = answer(200, ORTHANC_JSON, [B]).outcomes[B]
    assert outcome.warning and "warning 0xB000 (coercion of data elements)" in outcome.detail
    assert verdicts(200, None, [A]) == {A: "delivered"}


def test_202_decides_per_instance_by_failure_reason() -> None:
    data = {
        "00081199": ORTHANC_JSON["00081199"],
        "00081198": {"Value": [failure(C, 0x0110)]},
    }
    assert verdicts(202, data, [A, B, C, "1.9"]) == {
        A: "delivered",
        B: "delivered",
        C: "retry",  # processing failure: may pass later
        "1.9": "retry",  # a 202 that does not list an instance: not known to be stored
    }
    busy = answer(202, {"00081198": {"Value": [failure(C, 0xA700)]}}, [C]).outcomes[C]
    assert busy.verdict == "retry" and busy.busy
    assert "0xA700 (out of resources)" in busy.detail


def test_409_reasons_refuse_retry_or_try_the_next_syntax() -> None:
    data = {
        "00081198": {
            "Value": [
                failure(A, 0xA900),
                failure(B, 0xC122),
                failure(C, 0x0111),
                failure("1.8", 0x0122),
            ]
        }
    }
    assert verdicts(409, data, [A, B, C, "1.8"]) == {
        A: Verdict.REFUSED,
        B: Verdict.NEXT_SYNTAX,
        C: Verdict.DELIVERED,  # a duplicate: it has the instance (a resend after a crash)
        "1.8": Verdict.REFUSED,
    }
    assert (
        "409 Conflict from " + WHERE + ": failed, 0xA900"
        in answer(409, data, [A]).outcomes[A].detail
    )


@pytest.mark.parametrize("status", [401, 403, 408, 429, 500, 502, 503, 504])
def test_these_statuses_hold_the_destination(status: int) -> None:
    result = answer(status, None, [A, B])
    assert result.hold is not None and result.hold.startswith(f"{status} ")
    assert result.hold.endswith(f" from {WHERE}")
    assert not result.outcomes


def test_401_names_itself_and_the_server() -> None:
    assert answer(401, None, [A]).hold == f"401 Unauthorized from {WHERE}"


def test_415_tries_the_next_syntax_for_every_instance() -> None:
    assert verdicts(415, None, [A, B]) == {A: "next syntax", B: "next syntax"}


def test_other_4xx_refuse_but_first_split_a_batch() -> None:
    assert verdicts(400, None, [A, B]) == {A: "alone", B: "alone"}
    assert verdicts(400, None, [A]) == {A: "refused"}
    assert verdicts(404, None, [A]) == {A: "refused"}
    # Orthanc answers 400 for a request with one unreadable part, listing what it stored.
    listed = {"00081199": {"Value": [{"00081155": {"Value": [A]}}]}}
    assert verdicts(400, listed, [A, B]) == {A: "delivered", B: "alone"}
    assert verdicts(301, None, [A]) == {A: "refused"}


def test_an_unreadable_body_falls_back_on_the_status_and_says_so() -> None:
    result = read_answer(202, "application/dicom+json", b"{oops", [A], WHERE)
    assert result.outcomes[A].verdict == "retry"
    assert "not JSON" in result.outcomes[A].detail
