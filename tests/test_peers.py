"""Third-party peers send real files to a real node: the peer matrix of docs/conformance.md.

Each test runs one peer program (DCMTK dcmsend, pynetdicom's storescu and echoscu, GDCM
gdcmscu, Orthanc as a sending modality) against a node started by `start_node`, and checks
three things by value:
- what the peer itself reports (exit status, its own per-instance status lines);
- that the node stored every instance sent, with the data set after the file meta equal to
  what the peer sent: byte for byte where the peer sends the file's own encoding; element by
  element with pydicom, by value, where the peer re-encodes (pynetdicom's storescu -xi to
  Implicit VR; dcmsend and Orthanc decompressing for a node that accepts native syntaxes
  only, where the pixels are compared with the file's decoded pixels too);
- the node's log line for each stored instance, which names the calling AE and the
  transfer syntax.
Every test runs against both acceptors, the native one and pynetdicom's.
DCMTK storescu/echoscu/findscu/getscu and Orthanc as a destination are covered elsewhere.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from tests.conftest import StartNode
from tests.corpus import dataset_bytes, find
from tests.orthanc import Orthanc
from tests.support import BOTH_ACCEPTORS, NodeProcess, require_tool, wait_until

PEER_TIMEOUT = 60.0
TRAILING_PADDING = 0xFFFCFFFC
PIXEL_DATA = 0x7FE00010
LOSSLESS_FILES = ("MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm")
# A folder a sender sends on one association, proposing each file's own transfer syntax.
CT_MR_AND_JPEG_LS = ("CT_small.dcm", "MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm")
# gdcm 3.0.21 as packaged by Debian throws from its client after the association is
# released, whatever the SCP (DCMTK storescp too), and the uncaught exception aborts it.
GDCMSCU_ABORT = "ProtocolStream as nullptr is invalid"


def fresh_copy(name: str, folder: Path) -> Path:
    """A copy of a pydicom test file with its own SOP Instance UID, in its own transfer
    syntax, so that files sharing a UID (MR_small and its compressed variants) do not
    overwrite each other in the archive."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = pydicom.dcmread(find(name))
    uid = generate_uid()
    dataset.SOPInstanceUID = uid
    dataset.file_meta.MediaStorageSOPInstanceUID = uid
    # PS3.10 allows Data Set Trailing Padding in files only; DCMTK's senders (dcmsend,
    # storescu, Orthanc) leave it out of the C-STORE, pynetdicom sends it. Without it, every
    # peer's data set on the wire is the file's own.
    if TRAILING_PADDING in dataset:
        del dataset[TRAILING_PADDING]
    # MR_small_jpeg_ls_lossless.dcm labels its encapsulated Pixel Data OW; PS3.5 A.4 says OB,
    # and DCMTK's senders correct it on the wire.
    if dataset.file_meta.TransferSyntaxUID.is_compressed and "PixelData" in dataset:
        dataset["PixelData"].VR = "OB"
    path = folder / f"{uid}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def stored_files(node: NodeProcess) -> dict[str, Path]:
    """The archive's files by SOP Instance UID (the file name the default layout gives)."""
    archive = node.config_path.parent / "archive"
    return {path.stem: path for path in archive.rglob("*.dcm") if ".incoming" not in path.parts}


def wait_for_stored(node: NodeProcess, uids: Iterable[str]) -> dict[str, Path]:
    wanted = set(uids)
    assert wait_until(lambda: wanted <= set(stored_files(node)), timeout=30), (
        f"not stored: {wanted - set(stored_files(node))}\n{node.log()}"
    )
    return stored_files(node)


def stored_line(node: NodeProcess, uid: str, calling_ae: str) -> re.Match[str]:
    """The node's log line for one stored instance: it names the calling AE."""
    pattern = re.compile(
        rf"stored SOP Instance UID {re.escape(uid)} from '{re.escape(calling_ae)}': "
        r"(?P<received>\S+) -> (?P<stored>\S+),"
    )
    assert wait_until(lambda: pattern.search(node.log()) is not None, timeout=30), node.log()
    found = pattern.search(node.log())
    assert found is not None
    return found


def released_lines(node: NodeProcess, calling_ae: str) -> list[re.Match[str]]:
    """The node's log lines for associations released normally (not aborted), by calling AE."""
    pattern = re.compile(
        rf"association released: \S+ '{re.escape(calling_ae)}' -> 'DICOMNODE', "
        r"(?P<accepted>\d+)/(?P<proposed>\d+) contexts accepted \((?P<syntaxes>[^)]*)\), "
        r"(?P<instances>\d+) instances received \([^)]*\), (?P<refused>\d+) refused"
    )
    assert wait_until(lambda: pattern.search(node.log()) is not None, timeout=30), node.log()
    return list(pattern.finditer(node.log()))


def released_line(node: NodeProcess, calling_ae: str) -> re.Match[str]:
    """The one association a peer opened, released normally."""
    lines = released_lines(node, calling_ae)
    assert len(lines) == 1, [line[0] for line in lines]
    return lines[0]


def element_differences(
    sent: Dataset, stored: Dataset, where: str = "", ignore: frozenset[int] = frozenset()
) -> list[str]:
    """Elements that differ by tag, VR or value, recursing into sequences."""
    differences = []
    for tag in sorted((set(sent.keys()) | set(stored.keys())) - ignore):
        if tag not in sent or tag not in stored:
            differences.append(f"{where}{tag}: only in {'sent' if tag in sent else 'stored'}")
            continue
        a, b = sent[tag], stored[tag]
        if a.VR == "SQ" and b.VR == "SQ" and len(a.value) == len(b.value):
            for index, (item_a, item_b) in enumerate(zip(a.value, b.value, strict=True)):
                differences += element_differences(item_a, item_b, f"{where}{tag}[{index}].")
        elif a.VR != b.VR or a.value != b.value:
            differences.append(f"{where}{tag}: sent {a.VR} {a.repval}, stored {b.VR} {b.repval}")
    return differences


def assert_stored_byte_identical(node: NodeProcess, sent: Path, calling_ae: str) -> None:
    """The node stored the file's data set exactly as it is in the file, in its own syntax."""
    uid = pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID
    stored = wait_for_stored(node, [uid])[uid]
    assert dataset_bytes(stored.read_bytes()) == dataset_bytes(sent.read_bytes()), (
        f"{sent.name}: the stored data set differs from the one sent"
    )
    syntax = pydicom.dcmread(sent, stop_before_pixels=True).file_meta.TransferSyntaxUID
    line = stored_line(node, uid, calling_ae)
    assert (line["received"], line["stored"]) == (syntax.keyword, syntax.keyword), line[0]


def accept_native_only(sections: dict[str, object]) -> None:
    """A node that accepts no compressed transfer syntax: the peer must decompress."""
    sections["accept"] = {"transfer_syntaxes": ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian"]}


def assert_stored_as_decompressed(node: NodeProcess, sent: Path, calling_ae: str) -> None:
    """The peer decompressed a lossless file to Explicit VR Little Endian itself: the node
    stored that, every element but Pixel Data equal by value to the sent file's, and the
    pixels equal to the sent file's decoded pixels."""
    uid = sent.stem
    stored = pydicom.dcmread(wait_for_stored(node, [uid])[uid])
    source = pydicom.dcmread(sent)
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert element_differences(source, stored, ignore=frozenset({PIXEL_DATA})) == []
    assert numpy.array_equal(stored.pixel_array, source.pixel_array), f"{sent.name}: pixels differ"
    line = stored_line(node, uid, calling_ae)
    assert (line["received"], line["stored"]) == ("ExplicitVRLittleEndian",) * 2, line[0]


def peer_env() -> dict[str, str]:
    # DCMTK and Orthanc use Nagle's algorithm unless told otherwise (see /work/shared).
    return {**os.environ, "TCP_NODELAY": "1"}


def run_peer(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=PEER_TIMEOUT,
        env=peer_env(),
    )


PYNETDICOM_STORE_SUCCESS = "Received Store Response (Status: 0x0000 - Success)"


def pynetdicom_app(app: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_peer(sys.executable, "-m", "pynetdicom", app, *args)


# ---------------------------------------------------------------------------- DCMTK dcmsend


@BOTH_ACCEPTORS
def test_dcmsend_sends_a_folder_of_ct_mr_and_jpeg_ls(start_node: StartNode, tmp_path: Path) -> None:
    """dcmsend --scan-directories on a folder of a CT, an MR and a JPEG-LS Lossless MR, one
    association: dcmsend proposes each file's own transfer syntax, the node accepts it and
    stores the data set as sent, byte for byte (dcmsend writes DCMTK's encoding of the file,
    which for these files is the file's own bytes)."""
    dcmsend = require_tool("dcmsend")
    folder = tmp_path / "send"
    sent = [fresh_copy(name, folder) for name in CT_MR_AND_JPEG_LS]
    node = start_node()
    result = run_peer(
        dcmsend, "-v", "-aet", "DCMSEND", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
        "--scan-directories", folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Number of SOP instances  : 3" in result.stderr, result.stderr
    assert "* with status SUCCESS  : 3" in result.stderr, result.stderr
    assert result.stderr.count("Received C-STORE Response (Success)") == 3, result.stderr
    for path in sent:
        assert_stored_byte_identical(node, path, "DCMSEND")
    line = released_line(node, "DCMSEND")
    assert (line["accepted"], line["proposed"], line["instances"]) == ("3", "3", "3"), line[0]


@BOTH_ACCEPTORS
def test_dcmsend_decompresses_for_a_node_that_accepts_native_only(
    start_node: StartNode, tmp_path: Path
) -> None:
    """dcmsend (its default --decompress-lossless) sends a JPEG-LS Lossless and an RLE Lossless
    MR to a node whose [accept] lists only the native syntaxes: dcmsend converts each to
    Explicit VR Little Endian itself, so the bytes on the wire are DCMTK's re-encoding; the
    stored data set is compared with the file element by element, and its pixels with the
    file's decoded pixels."""
    dcmsend = require_tool("dcmsend")
    sent = [fresh_copy(name, tmp_path / "send") for name in LOSSLESS_FILES]
    node = start_node(accept_native_only)
    result = run_peer(
        dcmsend, "-v", "-aet", "DCMSENDDEC", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
        *sent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "* with status SUCCESS  : 2" in result.stderr, result.stderr
    assert result.stderr.count("Converting transfer syntax: ") == 2, result.stderr
    for path in sent:
        assert_stored_as_decompressed(node, path, "DCMSENDDEC")
    line = released_line(node, "DCMSENDDEC")
    assert (line["syntaxes"], line["instances"]) == ("ExplicitVRLittleEndian", "2"), line[0]


# ----------------------------------------------------------------------- pynetdicom's apps


@BOTH_ACCEPTORS
def test_pynetdicom_echoscu(start_node: StartNode) -> None:
    """`python -m pynetdicom echoscu`: the Verification context is accepted, exit status 0,
    and the node logs the association with the calling AE."""
    node = start_node()
    result = pynetdicom_app(
        "echoscu", "-v", "-aet", "PYECHO", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)
    )
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Status: 0x0000 - Success)" in result.stderr, result.stderr
    line = released_line(node, "PYECHO")
    assert (line["accepted"], line["proposed"], line["instances"]) == ("1", "1", "0"), line[0]


@BOTH_ACCEPTORS
def test_pynetdicom_storescu_sends_ct_mr_and_rle(start_node: StartNode, tmp_path: Path) -> None:
    """`python -m pynetdicom storescu -cx` on a CT, an MR and an RLE Lossless MR: exit status 0,
    a Success response for each. pynetdicom's storescu re-encodes each file with pydicom
    (dcmread, then encode in the accepted context, here the file's own syntax); for these
    files pydicom's encoding is the file's own bytes, so the stored data set is compared byte
    for byte."""
    sent = [
        fresh_copy(name, tmp_path) for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm")
    ]
    node = start_node()
    result = pynetdicom_app(
        "storescu", "-v", "-cx", "-aet", "PYSTORE", "-aec", "DICOMNODE",
        "127.0.0.1", str(node.port), *sent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(PYNETDICOM_STORE_SUCCESS) == 3, result.stderr
    for path in sent:
        assert_stored_byte_identical(node, path, "PYSTORE")
    line = released_line(node, "PYSTORE")
    assert (line["instances"], line["refused"]) == ("3", "0"), line[0]


@BOTH_ACCEPTORS
def test_pynetdicom_storescu_re_encodes_to_implicit_vr(
    start_node: StartNode, tmp_path: Path
) -> None:
    """`python -m pynetdicom storescu -xi` proposes Implicit VR Little Endian only, so it
    re-encodes the Explicit VR Little Endian CT and MR on the way: the bytes on the wire are
    not the file's, and the stored Implicit VR data set is compared with the sent file
    element by element, by tag, VR (from the dictionary on the stored side) and value."""
    sent = [fresh_copy(name, tmp_path) for name in ("CT_small.dcm", "MR_small.dcm")]
    node = start_node()
    result = pynetdicom_app(
        "storescu", "-v", "-xi", "-aet", "PYIMPLICIT", "-aec", "DICOMNODE",
        "127.0.0.1", str(node.port), *sent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(PYNETDICOM_STORE_SUCCESS) == 2, result.stderr
    uids = [path.stem for path in sent]
    stored = wait_for_stored(node, uids)
    for path, uid in zip(sent, uids, strict=True):
        stored_dataset = pydicom.dcmread(stored[uid])
        assert stored_dataset.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert element_differences(pydicom.dcmread(path), stored_dataset) == []
        line = stored_line(node, uid, "PYIMPLICIT")
        assert (line["received"], line["stored"]) == ("ImplicitVRLittleEndian",) * 2, line[0]
    line = released_line(node, "PYIMPLICIT")
    assert (line["syntaxes"], line["instances"]) == ("ImplicitVRLittleEndian", "2"), line[0]


# ---------------------------------------------------------------------------- GDCM gdcmscu


def assert_gdcmscu_finished(result: subprocess.CompletedProcess[str]) -> None:
    """gdcmscu exits 0, or aborts (SIGABRT, exit status -6) with its known client-side bug
    after the association was released; anything else is a failure."""
    if result.returncode == -signal.SIGABRT:
        assert GDCMSCU_ABORT in result.stderr, result.stderr
    else:
        assert result.returncode == 0, result.stderr


@BOTH_ACCEPTORS
def test_gdcmscu_echo(start_node: StartNode) -> None:
    """gdcmscu --echo. gdcm 3.0.21 (Debian) aborts on the client side after the release,
    "ProtocolStream as nullptr is invalid", exit status -6 (SIGABRT), against DCMTK storescp
    and pynetdicom's storescp as much as against the node; so the node's side is what is
    asserted: the association with the calling AE was released normally, not aborted, after
    its one Verification context was accepted."""
    gdcmscu = require_tool("gdcmscu")
    node = start_node()
    result = run_peer(
        gdcmscu, "--echo", "--aetitle", "GDCMECHO", "--call", "DICOMNODE",
        "127.0.0.1", str(node.port),
    )  # fmt: skip
    assert_gdcmscu_finished(result)
    line = released_line(node, "GDCMECHO")
    assert (line["accepted"], line["proposed"], line["instances"]) == ("1", "1", "0"), line[0]


@BOTH_ACCEPTORS
def test_gdcmscu_store_sends_a_folder(start_node: StartNode, tmp_path: Path) -> None:
    """gdcmscu --store -i FOLDER with a CT, an MR and a JPEG-LS Lossless MR, one association
    proposing each file's own transfer syntax. Exit status -6 (SIGABRT) after the release, as
    for --echo (the same gdcm bug): by then every instance was answered and the association
    released, not aborted. Each is stored byte-identical, in its own syntax."""
    gdcmscu = require_tool("gdcmscu")
    folder = tmp_path / "send"
    sent = [fresh_copy(name, folder) for name in CT_MR_AND_JPEG_LS]
    node = start_node()
    result = run_peer(
        gdcmscu, "--store", "--aetitle", "GDCMSTORE", "--call", "DICOMNODE", "-i", folder,
        "127.0.0.1", str(node.port),
    )  # fmt: skip
    assert_gdcmscu_finished(result)
    for path in sent:
        assert_stored_byte_identical(node, path, "GDCMSTORE")
    line = released_line(node, "GDCMSTORE")
    assert (line["instances"], line["refused"]) == ("3", "0"), line[0]
    assert line["syntaxes"] == "ExplicitVRLittleEndian, JPEGLSLossless", line[0]


# ------------------------------------------------------------------------ Orthanc as sender


def orthanc_sending_to(node: NodeProcess, folder: Path, ae_title: str) -> Orthanc:
    """An Orthanc (not started) that knows the node as its DICOM modality "node"."""
    return Orthanc(folder, ae_title, modalities={"node": ["DICOMNODE", "127.0.0.1", node.port]})


@BOTH_ACCEPTORS
def test_orthanc_sends_ct_and_jpeg_ls_to_the_node(start_node: StartNode, tmp_path: Path) -> None:
    """Orthanc as a sending modality: instances uploaded by REST (POST /instances), then
    POST /modalities/node/store makes Orthanc C-STORE them to the node, synchronously.
    Orthanc sends what it holds in its own transfer syntax when accepted, so the data set
    the node stored is compared byte for byte with Orthanc's own copy
    (GET /instances/{id}/file), and with the file uploaded."""
    folder = tmp_path / "send"
    sent = [fresh_copy(name, folder) for name in ("CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm")]
    node = start_node()
    orthanc = orthanc_sending_to(node, tmp_path / "orthanc", "ORTHANCSND")
    with orthanc:
        ids = [orthanc.upload(path) for path in sent]
        job = orthanc.store_to("node", ids)
        held = [orthanc.file(instance) for instance in ids]
    assert (job["InstancesCount"], job["FailedInstancesCount"]) == (2, 0), job
    assert (job["LocalAet"], job["RemoteAet"]) == ("ORTHANCSND", "DICOMNODE"), job
    for path, orthanc_copy in zip(sent, held, strict=True):
        assert dataset_bytes(orthanc_copy) == dataset_bytes(path.read_bytes())
        assert_stored_byte_identical(node, path, "ORTHANCSND")
    # Orthanc 1.10 opened a second association for the JPEG-LS instance, whose syntax the
    # first one had not proposed.
    associations = released_lines(node, "ORTHANCSND")
    assert sum(int(line["instances"]) for line in associations) == 2, node.log()
    assert all(line["refused"] == "0" for line in associations), node.log()


@BOTH_ACCEPTORS
def test_orthanc_decompresses_for_a_node_that_accepts_native_only(
    start_node: StartNode, tmp_path: Path
) -> None:
    """Orthanc holding a JPEG-LS Lossless and an RLE Lossless MR C-STOREs them to a node whose
    [accept] lists only the native syntaxes: Orthanc transcodes each to a native syntax
    itself (here to Explicit VR Little Endian), so the stored data set is compared with the
    uploaded file element by element, and its pixels with the file's decoded pixels."""
    sent = [fresh_copy(name, tmp_path / "send") for name in LOSSLESS_FILES]
    node = start_node(accept_native_only)
    orthanc = orthanc_sending_to(node, tmp_path / "orthanc", "ORTHANCDEC")
    with orthanc:
        ids = [orthanc.upload(path) for path in sent]
        job = orthanc.store_to("node", ids)
    assert (job["InstancesCount"], job["FailedInstancesCount"]) == (2, 0), job
    for path in sent:
        assert_stored_as_decompressed(node, path, "ORTHANCDEC")
    associations = released_lines(node, "ORTHANCDEC")
    assert sum(int(line["instances"]) for line in associations) == 2, node.log()
