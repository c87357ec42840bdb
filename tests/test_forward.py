"""Forwarding to real peers: Orthanc and DCMTK storescp as destinations, storescu as modality."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from tests.corpus import copies_with_new_uids, find, sop_instance_uid
from tests.forward_support import (
    RefusingSCP,
    StoreSCP,
    destination,
    forwarding_config,
    queue_cli,
)
from tests.orthanc import Orthanc
from tests.support import BOTH_ACCEPTORS, configured_node, free_port, storescu, wait_until

pytestmark = pytest.mark.timeout(180)

# storescu proposes only uncompressed syntaxes unless told: -R plus one of these sends a
# file in its own compressed syntax.
SYNTAX_OPTION = {
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.5": "-xr",  # RLE
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
}


def send_as_is(port: int, files: list[Path]) -> None:
    """Send each file in its own transfer syntax (storescu config needs one run per syntax)."""
    by_syntax: dict[str, list[Path]] = {}
    for path in files:
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        by_syntax.setdefault(str(syntax), []).append(path)
    for syntax, group in by_syntax.items():
        option = SYNTAX_OPTION.get(syntax)
        args = ("-R", option) if option else ()
        sent = storescu(port, group, *args)
        assert sent.returncode == 0, sent.stderr


def us_multiframe(folder: Path) -> Path:
    """A 3-frame Ultrasound Multi-frame RGB instance built from US1_UNCR."""
    ds = pydicom.dcmread(find("US1_UNCR.dcm"))
    frame = ds.pixel_array
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.NumberOfFrames = 3
    ds.PixelData = np.stack([frame, frame[::-1], frame[:, ::-1]]).tobytes()
    path = folder / "us_multiframe.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def by_uid(blobs: list[bytes]) -> dict[str, pydicom.Dataset]:
    datasets = [pydicom.dcmread(io.BytesIO(blob)) for blob in blobs]
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


@BOTH_ACCEPTORS
def test_happy_path_mixed_set_arrives_in_orthanc_in_accepted_syntax(
    tmp_path: Path, acceptor: str
) -> None:
    sources = [
        find("CT_small.dcm"),  # CT, Explicit VR LE: encoded to JPEG 2000 lossless
        find("MR_small_RLE.dcm"),  # MR, RLE: decoded once, then encoded
        find("US1_J2KR.dcm"),  # US RGB as YBR_RCT JPEG 2000: sent as received
        find("SC_rgb.dcm"),  # RGB native
        find("emri_small_jpeg_ls_lossless.dcm"),  # Enhanced MR multi-frame, JPEG-LS
        us_multiframe(tmp_path / "made"),  # US multi-frame RGB
    ]
    port = free_port()
    with Orthanc(tmp_path / "orthanc") as orthanc:
        config = forwarding_config(
            tmp_path,
            port,
            [
                destination(
                    "pacs", "ORTHANC", orthanc.dicom_port, transfer_syntaxes=["JPEG2000Lossless"]
                )
            ],
        )
        config["node"]["acceptor"] = acceptor  # type: ignore[index]
        with configured_node(tmp_path, config=config) as node:
            send_as_is(port, sources)
            arrived = wait_until(lambda: orthanc.count() == len(sources), timeout=60)
            assert arrived, f"Orthanc has {orthanc.count()} of {len(sources)}\n{node.log()}"
            received = by_uid(orthanc.files())
    for source_path in sources:
        source = pydicom.dcmread(source_path)
        copy = received[str(source.SOPInstanceUID)]  # SOP Instance UID unchanged
        assert copy.file_meta.TransferSyntaxUID == JPEG2000Lossless, source_path.name
        assert np.array_equal(copy.pixel_array, source.pixel_array), source_path.name
        assert copy.SOPClassUID == source.SOPClassUID


def test_negotiation_evle_only_destination_gets_decoded_rgb(tmp_path: Path) -> None:
    source = find("US1_J2KR.dcm")  # YBR_RCT JPEG 2000 lossless
    port = free_port()
    scp = StoreSCP(tmp_path / "evle", "EVLEONLY").start()  # accepts uncompressed syntaxes only
    try:
        config = forwarding_config(
            tmp_path,
            port,
            [destination("plain", "EVLEONLY", scp.port, transfer_syntaxes=["JPEG2000Lossless"])],
        )
        with configured_node(tmp_path, config=config) as node:
            send_as_is(port, [source])
            assert wait_until(lambda: scp.count() == 1, timeout=30), node.log()
    finally:
        scp.stop()
    copy = pydicom.dcmread(scp.files()[0])
    original = pydicom.dcmread(source)
    assert copy.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert original.PhotometricInterpretation == "YBR_RCT"
    assert copy.PhotometricInterpretation == "RGB"
    assert copy.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(copy.pixel_array, original.pixel_array)


def test_rules_ct_to_a_mr_to_b_unmatched_kept_and_reported(tmp_path: Path) -> None:
    port = free_port()
    a = StoreSCP(tmp_path / "a", "DESTA").start()
    b = StoreSCP(tmp_path / "b", "DESTB").start()
    try:
        config = forwarding_config(
            tmp_path,
            port,
            [destination("a", "DESTA", a.port), destination("b", "DESTB", b.port)],
            routes=[
                {"match": {"SOPClassUID": CTImageStorage}, "destinations": ["a"]},
                {"match": {"Modality": "MR", "CallingAETitle": "STORE*"}, "destinations": ["b"]},
            ],
            routing={"unrouted_storage": "quarantine"},
        )
        config["storage"] = [
            {"name": "archive", "path": str(tmp_path / "archive")},
            {"name": "quarantine", "path": str(tmp_path / "quarantine")},
        ]
        node = configured_node(tmp_path, config=config)
        ct, mr, sc = find("CT_small.dcm"), find("MR_small.dcm"), find("SC_rgb.dcm")
        with node:
            assert storescu(port, [ct, mr, sc]).returncode == 0
            assert wait_until(lambda: a.count() == 1 and b.count() == 1, timeout=30), node.log()
            assert wait_until(lambda: len(list((tmp_path / "quarantine").rglob("*.dcm"))) == 1)
            time.sleep(0.5)  # anything misrouted would have arrived by now
            log = node.log()
        assert [sop_instance_uid(p) for p in a.files()] == [sop_instance_uid(ct)]
        assert [sop_instance_uid(p) for p in b.files()] == [sop_instance_uid(mr)]
        kept = list((tmp_path / "quarantine").rglob("*.dcm"))
        assert sop_instance_uid(kept[0]) == sop_instance_uid(sc)
        assert not (tmp_path / "archive").exists() or not list(
            (tmp_path / "archive").rglob("*.dcm")
        )
        assert "matched no route" in log and sop_instance_uid(sc) in log
    finally:
        a.stop()
        b.stop()


def test_dead_letter_with_reason_then_queue_retry_requeues(tmp_path: Path) -> None:
    port = free_port()
    refuser = RefusingSCP(tmp_path / "refuser").start()
    try:
        config = forwarding_config(
            tmp_path,
            port,
            [destination("picky", "REFUSER", refuser.port)],
            routes=[{"match": {"Modality": "*"}, "destinations": ["picky"]}],
        )
        node = configured_node(tmp_path, config=config)
        path = node.config_path
        ct, mr = find("CT_small.dcm"), find("MR_small.dcm")
        with node:
            assert storescu(port, [ct, mr]).returncode == 0
            assert wait_until(lambda: "dead letter" in node.log(), timeout=30), node.log()
            assert wait_until(lambda: refuser.count() == 1, timeout=10)
            status = queue_cli(path, "status")
            assert status.returncode == 0, status.stderr
            failed = [line for line in status.stdout.splitlines() if " failed " in line]
            assert len(failed) == 1 and "picky" in failed[0], status.stdout
            assert "0x0122" in failed[0] and "SOP class not supported" in failed[0]

            dry = queue_cli(path, "purge", "--destination", "picky")
            assert dry.returncode == 1 and "would delete 1" in dry.stdout

            refuser.allow_mr()
            retried = queue_cli(path, "retry", "--destination", "picky", "--failed")
            assert retried.returncode == 0 and retried.stdout.startswith("1 "), retried.stdout
            assert wait_until(lambda: refuser.count() == 2, timeout=30), node.log()
            assert wait_until(lambda: " failed " not in queue_cli(path, "status").stdout)
        spool = tmp_path / "data" / "spool"
        assert wait_until(lambda: not list(spool.glob("*.dcm")), timeout=5)
    finally:
        refuser.stop()


def test_max_attempts_turns_an_unreachable_destination_into_dead_letters(tmp_path: Path) -> None:
    port = free_port()
    nobody = free_port()  # nothing listens here
    retry = {"initial_delay": 0.2, "max_delay": 0.5, "max_attempts": 2}
    config = forwarding_config(tmp_path, port, [destination("gone", "GONE", nobody, retry=retry)])
    node = configured_node(tmp_path, config=config)
    path = node.config_path
    with node:
        assert storescu(port, [find("CT_small.dcm")]).returncode == 0
        assert wait_until(lambda: " failed " in queue_cli(path, "status").stdout, timeout=20)
        status = queue_cli(path, "status").stdout
        assert "gave up after 2 attempts: cannot connect to GONE@127.0.0.1" in status, status
        assert "dead letter" in node.log()


def test_queue_retry_ends_a_long_backoff_at_once(tmp_path: Path) -> None:
    port = free_port()
    late = StoreSCP(tmp_path / "late", "LATE")  # port chosen, not started yet
    retry = {"initial_delay": 120, "max_delay": 600}
    config = forwarding_config(
        tmp_path, port, [destination("late", "LATE", late.port, retry=retry)]
    )
    node = configured_node(tmp_path, config=config)
    path = node.config_path
    try:
        with node:
            assert storescu(port, [find("CT_small.dcm")]).returncode == 0
            assert wait_until(lambda: "holding its jobs" in node.log(), timeout=20), node.log()
            status = queue_cli(path, "status").stdout
            assert " in 1m" in status or " in 2m" in status, status  # the long backoff shows
            late.start()
            time.sleep(2)
            assert late.count() == 0  # still in its backoff
            assert queue_cli(path, "retry", "--destination", "late").returncode == 0
            assert wait_until(lambda: late.count() == 1, timeout=10), node.log()
    finally:
        late.stop()


def test_stop_does_not_wait_for_a_destination_that_never_answers(tmp_path: Path) -> None:
    port = free_port()
    stuck = RefusingSCP(tmp_path / "stuck", "hang").start()
    config = forwarding_config(tmp_path, port, [destination("stuck", "REFUSER", stuck.port)])
    node = configured_node(tmp_path, config=config)
    path = node.config_path
    node.start()
    try:
        assert storescu(port, [find("CT_small.dcm")]).returncode == 0
        time.sleep(2)  # the C-STORE to 'stuck' is now waiting for an answer (DIMSE timeout 60 s)
        started = time.monotonic()
        assert node.stop() == 0, node.log()
        assert time.monotonic() - started < 15, node.log()
        assert "aborting the association of forward-stuck-0" in node.log()
    finally:
        node.kill()
        stuck.stop()
    status = queue_cli(path, "status").stdout
    stuck_jobs = [line.split() for line in status.splitlines() if line.startswith("forward")]
    assert stuck_jobs[0][1:4] == ["stuck", "pending", "1"], status  # kept for the next start


def test_out_of_resources_backs_off_the_destination_then_delivers(tmp_path: Path) -> None:
    port = free_port()
    full = RefusingSCP(tmp_path / "full", "full").start()
    config = forwarding_config(tmp_path, port, [destination("full", "REFUSER", full.port)])
    node = configured_node(tmp_path, config=config)
    path = node.config_path
    try:
        with node:
            files = copies_with_new_uids(find("CT_small.dcm"), tmp_path / "send", 3)
            assert storescu(port, files).returncode == 0
            assert wait_until(lambda: "holding its jobs" in node.log(), timeout=20), node.log()
            status = queue_cli(path, "status").stdout
            assert "status 0xA700 (out of resources)" in status, status
            rows = [line.split()[:4] for line in status.splitlines()]
            assert ["forward", "full", "pending", "3"] in rows, status  # none dead-lettered
            full.allow_mr()  # the disk over there has room again
            assert wait_until(lambda: full.count() == 3, timeout=20), node.log()
    finally:
        full.stop()
