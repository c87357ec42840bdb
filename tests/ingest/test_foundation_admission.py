"""Who gets in and what gets refused: unparseable datasets, AE titles, association limits."""

from __future__ import annotations

import os
import random
import struct
import subprocess
from pathlib import Path

from pynetdicom.sop_class import Verification

from tests.conftest import StartNode
from tests.corpus import CT_SMALL
from tests.foundation_helpers import associate, encoded_dataset, pynetdicom_store, store_raw_bytes
from tests.support import BOTH_ACCEPTORS, require_tool, wait_until

CANNOT_UNDERSTAND = 0xC210
# A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 = rejected-permanent, 2 = rejected-transient;
# source 1 = service-user, 3 = service-provider (presentation related).
CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


def truncated(encoded: bytes) -> bytes:
    """The dataset cut in the middle of Pixel Data, as a broken sender might send it."""
    return encoded[: len(encoded) - 1000]


def length_past_end(encoded: bytes) -> bytes:
    """Patient's Name (0010,0010, a short VR) claims far more bytes than the dataset has."""
    at = encoded.index(b"\x10\x00\x10\x00PN")
    return encoded[: at + 6] + struct.pack("<H", 0xFFF0) + encoded[at + 8 :]


# storescu cannot be the sender here: DCMTK parses a file before sending it and
# refuses one whose dataset is cut short ("Bad DICOM file"), so it never sends
# broken bytes. pynetdicom in chunked mode sends a file's bytes untouched.


def garbage(encoded: bytes) -> bytes:
    """Random bytes in place of a dataset."""
    return random.Random(7).randbytes(4096)


def spool_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "data" / "spool").rglob("*") if p.is_file())


@BOTH_ACCEPTORS
def test_unparseable_datasets_are_refused_and_the_node_keeps_serving(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node()
    sop_class, sop_instance, encoded = encoded_dataset()
    for damage in (truncated, length_past_end, garbage):
        status = store_raw_bytes(node.port, tmp_path, sop_class, sop_instance, damage(encoded))
        assert status == CANNOT_UNDERSTAND, f"{damage.__name__}: 0x{status:04X}"
        assert spool_files(tmp_path) == [], damage.__name__
    # The same bytes undamaged are stored: the refusals were about the damage.
    assert store_raw_bytes(node.port, tmp_path, sop_class, sop_instance, encoded) == 0x0000
    assert pynetdicom_store(node.port, CT_SMALL) == 0x0000
    assert node.alive()
    assert "refused" in node.log() and "truncated" in node.log()


def reject_reason(assoc) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    assert assoc.is_rejected, (
        f"association was not rejected: established={assoc.is_established} aborted={assoc.is_aborted}"
    )
    primitive = assoc.acceptor.primitive
    return (primitive.result, primitive.result_source, primitive.diagnostic)


def echo_contexts() -> list[tuple[str, list[str]]]:
    return [(Verification, ["1.2.840.10008.1.2"])]


@BOTH_ACCEPTORS
def test_calling_ae_not_in_allowlist_is_rejected(start_node: StartNode) -> None:
    def allow_only_modality(sections: dict[str, object]) -> None:
        sections["security"] = {"allowed_calling_aets": ["MODALITY"]}

    node = start_node(allow_only_modality)
    rejected = associate(node.port, echo_contexts(), calling="INTRUDER")
    assert reject_reason(rejected) == CALLING_AE_NOT_RECOGNIZED
    accepted = associate(node.port, echo_contexts(), calling="MODALITY")
    assert accepted.is_established
    accepted.release()
    echoscu = require_tool("echoscu")
    env = {**os.environ, "TCP_NODELAY": "1"}
    wrong = [echoscu, "-aet", "INTRUDER", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)]
    right = [echoscu, "-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)]
    assert subprocess.run(wrong, capture_output=True, env=env).returncode != 0
    assert subprocess.run(right, capture_output=True, env=env).returncode == 0
    assert "INTRUDER" in node.log() and "allowed_calling_aets" in node.log()


@BOTH_ACCEPTORS
def test_wrong_called_ae_is_rejected_when_required(start_node: StartNode) -> None:
    node = start_node()
    rejected = associate(node.port, echo_contexts(), called="SOMEONEELSE")
    assert reject_reason(rejected) == CALLED_AE_NOT_RECOGNIZED
    echoscu = require_tool("echoscu")
    wrong = [echoscu, "-aec", "SOMEONEELSE", "127.0.0.1", str(node.port)]
    assert subprocess.run(wrong, capture_output=True).returncode != 0


def test_any_called_ae_is_accepted_when_not_required(start_node: StartNode) -> None:
    def relax(sections: dict[str, object]) -> None:
        sections["security"] = {"require_called_aet": False}

    node = start_node(relax)
    accepted = associate(node.port, echo_contexts(), called="ANY-SCP")
    assert accepted.is_established
    accepted.release()


@BOTH_ACCEPTORS
def test_max_associations_is_honoured(start_node: StartNode) -> None:
    # pynetdicom counts every connection it is serving, even one still negotiating;
    # the node's limit is therefore a limit on connections, which is what protects it.
    node = start_node(max_associations=1)
    first = associate(node.port, echo_contexts())
    assert first.is_established
    try:
        second = associate(node.port, echo_contexts())
        assert reject_reason(second) == LOCAL_LIMIT_EXCEEDED
    finally:
        first.release()
    # The slot is free again once the first association is released.
    assert wait_for_association(node.port)


def wait_for_association(port: int) -> bool:
    def try_once() -> bool:
        assoc = associate(port, echo_contexts())
        if assoc.is_established:
            assoc.release()
            return True
        return False

    return wait_until(try_once, timeout=10, interval=0.2)
