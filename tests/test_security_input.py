"""Hostile datasets: decompression bombs, lengths past the end, deep nesting, size and disk limits,
and tag values aimed at the storage path template."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from node.ingest.intake import Status, StoreRequest
from node.store.layout import MAX_COMPONENT_LENGTH
from tests.corpus import PYDICOM_FILES
from tests.support import base_config, configured_node, free_port, storescu, wait_until
from tests.test_fuzz import IntakeRig, seed

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element."""
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHL", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def identity(sop_instance_uid: str) -> bytes:
    uid = sop_instance_uid.encode() + b"\0" * (len(sop_instance_uid) % 2)
    return element(0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.encode() + b"\0") + element(
        0x0008, 0x0018, b"UI", uid
    )


def request(dataset: bytes, uid: str, syntax: str = ExplicitVRLittleEndian) -> StoreRequest:
    return StoreRequest(CT_IMAGE_STORAGE, uid, syntax, "HOSTILE", "DICOMNODE", dataset)


def test_a_deflate_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    rig = IntakeRig(tmp_path)
    rig.intake.max_instance_size = 8 * 1024 * 1024
    uid = generate_uid()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    gigabyte = 1 << 30
    bomb = compressor.compress(
        identity(uid) + struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, gigabyte)
    )
    zeros = bytes(1 << 24)
    for _ in range(gigabyte >> 24):
        bomb += compressor.compress(zeros)
    bomb += compressor.flush()
    assert len(bomb) < 2 * 1024 * 1024
    result = rig.intake.receive(request(bomb, uid, DeflatedExplicitVRLittleEndian))
    assert result.status == Status.CANNOT_UNDERSTAND
    assert "inflates to more than 8388608 bytes" in result.reason


def test_an_element_length_past_the_end_is_refused(tmp_path: Path) -> None:
    rig = IntakeRig(tmp_path)
    uid = generate_uid()
    dataset = identity(uid) + element(0x0010, 0x0010, b"PN", b"DOE^JOHN")
    hostile = dataset[:-10] + struct.pack("<H", 0xFFF0) + dataset[-8:]
    result = rig.intake.receive(request(hostile, uid))
    assert result.status == Status.CANNOT_UNDERSTAND
    assert "claims 65520 bytes" in result.reason
    pixel_claim = identity(uid) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 0xFFFFFFF0)
    result = rig.intake.receive(request(pixel_claim + b"\0" * 64, uid))
    assert result.status == Status.CANNOT_UNDERSTAND
    assert "truncated" in result.reason
    assert rig.spooled() == set()


def test_thousands_of_nested_sequences_get_an_answer(tmp_path: Path) -> None:
    rig = IntakeRig(tmp_path)
    for depth, nested in ((5000, "defined"), (5000, "undefined")):
        uid = generate_uid()
        body = element(0x0010, 0x0010, b"PN", b"DOE^JOHN")
        for _ in range(depth):
            if nested == "defined":
                item = struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body
                body = element(0x0040, 0xA730, b"SQ", item)
            else:
                item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + body
                item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
                body = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + item
                body += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        result = rig.intake.receive(request(identity(uid) + body, uid))
        assert result.status in (Status.SUCCESS, Status.CANNOT_UNDERSTAND), result
        if nested == "undefined":
            assert "nested deeper than" in result.reason


def test_instance_size_and_disk_headroom_limits_answer_out_of_resources(tmp_path: Path) -> None:
    small = seed("MR_small.dcm")
    large = seed("CT_small.dcm")
    assert len(small.dataset) < 20_000 < len(large.dataset)
    port = free_port()
    sections = base_config(tmp_path, port)
    sections["limits"] = {"min_free_space": 0, "max_instance_size": 20_000}
    with configured_node(tmp_path, config=sections) as node:
        storescu(port, [PYDICOM_FILES / "CT_small.dcm"])
        storescu(port, [PYDICOM_FILES / "MR_small.dcm"])
        assert wait_until(lambda: len(list((tmp_path / "archive").rglob("*.dcm"))) == 1)
        stored = pydicom.dcmread(next((tmp_path / "archive").rglob("*.dcm")))
        assert stored.SOPInstanceUID == small.sop_instance_uid
        assert "status 0xA700: instance is" in node.log()
        assert "over limits.max_instance_size=20000" in node.log()

    port = free_port()
    sections = base_config(tmp_path / "full", port)
    sections["limits"] = {"min_free_space": 1 << 60}  # more than any disk: always "full"
    with configured_node(tmp_path / "full", config=sections) as node:
        storescu(port, [PYDICOM_FILES / "MR_small.dcm"])
        assert "status 0xA700: free disk space is below limits.min_free_space" in node.log()
        assert not list((tmp_path / "full" / "archive").rglob("*.dcm"))


def test_hostile_tag_values_in_the_path_template_stay_inside_storage(tmp_path: Path) -> None:
    port = free_port()
    sections = base_config(tmp_path, port)
    layout = "{PatientID}/{StudyInstanceUID}/{SeriesDescription}/{SOPInstanceUID}.dcm"
    sections["storage"] = [{"name": "archive", "path": str(tmp_path / "archive"), "layout": layout}]
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.PatientID = "../../../../../../tmp/escape"
    ds.StudyInstanceUID = ".."
    ds.SeriesDescription = "\x00/\\:*?<>|\x1b[31m" + "A" * 5000
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    hostile = tmp_path / "hostile.dcm"
    ds.save_as(hostile)
    with configured_node(tmp_path, config=sections):
        assert storescu(port, [hostile]).returncode == 0
        archive = (tmp_path / "archive").resolve()
        assert wait_until(lambda: list(archive.rglob("*.dcm")), timeout=15)
        stored = next(archive.rglob("*.dcm")).resolve()
        assert stored.is_relative_to(archive)
        parts = stored.relative_to(archive).parts
        assert len(parts) == 4
        assert all(len(part.encode()) <= MAX_COMPONENT_LENGTH + 4 for part in parts), parts
        assert all(part not in ("", ".", "..") and "/" not in part for part in parts)
        assert not Path("/tmp/escape").exists()
