"""DICOMweb destinations against a real Orthanc with its DICOMweb plugin and HTTP basic
auth: a mixed corpus checked back by QIDO-RS and WADO-RS, an outage mid-batch, kill -9
with a backlog, and a wrong password fixed without a restart."""

from __future__ import annotations

import email.parser
import email.policy
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from tests.conftest import StartNode
from tests.corpus import copies_with_new_uids, find, sop_instance_uid
from tests.forward.test_forward import send_as_is
from tests.forward_support import queue_cli
from tests.orthanc import Orthanc, dicomweb_plugin
from tests.support import NodeProcess, storescu, wait_until

pytestmark = pytest.mark.timeout(240)

USER, PASSWORD = "router", "s3cret-for-tests"
OUTAGE = 6.0  # seconds Orthanc stays down mid-batch: several failed retries (30 s proves no more)

# The mixed corpus: (file, copies). 100 instances: CT, MR, RGB US, multi-frame (Enhanced
# MR), compressed (RLE, JPEG 2000, JPEG lossless, JPEG baseline), and 32-bit RGB, which
# JPEG 2000 cannot hold (so it goes in the next syntax).
MIXED = (
    ("CT_small.dcm", 40),
    ("MR_small.dcm", 20),
    ("US1_UNCR.dcm", 4),
    ("emri_small.dcm", 10),
    ("emri_small_RLE.dcm", 6),
    ("MR_small_jp2klossless.dcm", 6),
    ("SC_rgb_jpeg_dcmtk.dcm", 4),
    ("US1_J2KR.dcm", 4),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", 2),
    ("SC_rgb_32bit.dcm", 2),
    ("MR_small_RLE.dcm", 2),
)
WANTED = ["JPEG2000Lossless", "ExplicitVRLittleEndian"]
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(
        tmp_path_factory.mktemp("orthanc"), plugins=(dicomweb_plugin(),), http_auth=(USER, PASSWORD)
    )
    server.start()
    yield server
    server.stop()


def password_file(folder: Path, password: str = PASSWORD) -> Path:
    path = folder / "orthanc.password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def web_destination(orthanc: Orthanc, secret: Path, **extra: object) -> dict[str, object]:
    return {
        "name": "web",
        "protocol": "dicomweb",
        "url": f"{orthanc.url}/dicom-web",
        "transfer_syntaxes": WANTED,
        "batch_size": 10,
        "idle_timeout": 2.0,
        "retry": {"initial_delay": 1, "max_delay": 4},
        "auth": {"username": USER, "password_file": str(secret)},
        **extra,
    }


def start_web_node(
    start_node: StartNode, orthanc: Orthanc, tmp_path: Path, **extra: object
) -> NodeProcess:
    target = web_destination(orthanc, password_file(tmp_path), **extra)
    return start_node(lambda config: config.update(destination=[target]))


def open_jobs(config: Path) -> dict[str, int]:
    status = queue_cli(config, "status", "--json")
    assert status.returncode == 0, status.stderr
    found: dict[str, int] = {}
    for row in json.loads(status.stdout):
        if row["kind"] == "forward" and row["state"] != "done":
            found[row["state"]] = found.get(row["state"], 0) + row["count"]
    return found


def last_errors(config: Path) -> str:
    status = queue_cli(config, "status", "--json")
    return " | ".join(str(row.get("last_error")) for row in json.loads(status.stdout))


def dicomweb_uids(orthanc: Orthanc) -> dict[str, tuple[str, str]]:
    """QIDO-RS: every SOP Instance UID Orthanc's DICOMweb serves, with study and series."""
    found = {}
    for study in orthanc.get("/dicom-web/studies"):
        study_uid = study["0020000D"]["Value"][0]
        for instance in orthanc.get(f"/dicom-web/studies/{study_uid}/instances?limit=1000"):
            series_uid = instance["0020000E"]["Value"][0]
            found[instance["00080018"]["Value"][0]] = (study_uid, series_uid)
    return found


def wado_instance(orthanc: Orthanc, study: str, series: str, sop: str) -> pydicom.Dataset:
    """WADO-RS: the instance as Orthanc stores it (transfer-syntax=*: not transcoded)."""
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    path = f"/dicom-web/studies/{study}/series/{series}/instances/{sop}"
    raw = orthanc.get(path, headers={"Accept": accept})
    # The Content-Type with its boundary comes from the response headers, which get() drops;
    # the body's first line is the boundary itself.
    boundary = raw.split(b"\r\n", 1)[0][2:].decode()
    message = f'Content-Type: multipart/related; boundary="{boundary}"\r\n\r\n'.encode() + raw
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(message)
    (part,) = list(parsed.iter_parts())
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(part.get_payload(decode=True)))


def expected_syntax(source: pydicom.Dataset) -> str:
    """The first of WANTED that the node can produce; a lossy instance goes as received."""
    received = source.file_meta.TransferSyntaxUID
    if received == JPEG_BASELINE:  # lossy
        return str(received)
    if source.BitsAllocated == 32:  # beyond JPEG 2000's 16-bit lossless ladder rung here
        return str(ExplicitVRLittleEndian)
    return str(JPEG2000Lossless)


def test_mixed_corpus_reaches_orthanc_with_identical_pixels(
    start_node: StartNode, orthanc: Orthanc, tmp_path: Path
) -> None:
    files = [
        path
        for name, count in MIXED
        for path in copies_with_new_uids(find(name), tmp_path / "send" / name, count)
    ]
    assert len(files) == 100
    sources = {sop_instance_uid(path): path for path in files}
    node = start_web_node(start_node, orthanc, tmp_path)
    send_as_is(node.port, files)
    assert wait_until(lambda: not open_jobs(node.config_path), timeout=90), (
        open_jobs(node.config_path),
        node.log_tail(30),
    )
    served = dicomweb_uids(orthanc)
    assert set(sources) <= set(served), sorted(set(sources) - set(served))[:5]
    syntaxes: dict[str, int] = {}
    for uid, path in sources.items():
        source = pydicom.dcmread(path)
        stored = wado_instance(orthanc, *served[uid], uid)
        syntax = str(stored.file_meta.TransferSyntaxUID)
        syntaxes[syntax] = syntaxes.get(syntax, 0) + 1
        assert syntax == expected_syntax(source), (path.parent.name, syntax)
        assert stored.SOPInstanceUID == uid
        assert np.array_equal(stored.pixel_array, source.pixel_array), path.parent.name
    assert syntaxes == {str(JPEG2000Lossless): 94, str(ExplicitVRLittleEndian): 2, JPEG_BASELINE: 4}
    assert node.stop() == 0


def test_orthanc_down_mid_batch_then_everything_arrives(
    start_node: StartNode, orthanc: Orthanc, tmp_path: Path
) -> None:
    files = copies_with_new_uids(find("693_UNCR.dcm"), tmp_path / "send", 60)
    uids = {sop_instance_uid(p) for p in files}
    before = set(dicomweb_uids(orthanc))
    node = start_web_node(start_node, orthanc, tmp_path, batch_size=5)
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stderr
    # Stopped while the node is delivering: some instances are there, most are not.
    assert wait_until(lambda: orthanc.count() > len(before), timeout=60, interval=0.05)
    orthanc.stop()
    stopped_at = time.monotonic()
    pending = open_jobs(node.config_path)
    assert sum(pending.values()) > 0, "everything arrived before Orthanc stopped: not mid-batch"
    assert wait_until(lambda: "cannot reach" in last_errors(node.config_path), timeout=20)
    assert node.logged("held for", timeout=10)
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - stopped_at)))
    orthanc.start()
    assert wait_until(lambda: not open_jobs(node.config_path), timeout=60), node.log_tail(20)
    assert uids <= set(dicomweb_uids(orthanc))
    assert node.stop() == 0
    assert not list((tmp_path / "data" / "spool").rglob("*.dcm"))


def test_kill_9_with_a_backlog_then_restart_delivers_every_acknowledged_instance(
    start_node: StartNode, orthanc: Orthanc, tmp_path: Path
) -> None:
    files = copies_with_new_uids(find("CT_small.dcm"), tmp_path / "send", 40)
    uids = {sop_instance_uid(p) for p in files}
    orthanc.stop()  # down during the send: a guaranteed backlog
    try:
        node = start_web_node(start_node, orthanc, tmp_path)
        sent = storescu(node.port, files, "-v")
        assert sent.stderr.count("Received Store Response (Success)") == 40, sent.stderr[-2000:]
        node.kill()
        assert sum(open_jobs(node.config_path).values()) == 40
    finally:
        orthanc.start()
    node = NodeProcess(node.config_path, node.port).start()
    try:
        assert wait_until(lambda: not open_jobs(node.config_path), timeout=60), node.log_tail(20)
        assert uids <= set(dicomweb_uids(orthanc))
        assert node.stop() == 0
    finally:
        node.kill()


def test_wrong_password_holds_with_401_then_fixing_the_file_delivers(
    start_node: StartNode, orthanc: Orthanc, tmp_path: Path
) -> None:
    files = copies_with_new_uids(find("MR_small.dcm"), tmp_path / "send", 5)
    uids = {sop_instance_uid(p) for p in files}
    secret = password_file(tmp_path, "not-the-password")
    target = web_destination(orthanc, secret)
    node = start_node(lambda config: config.update(destination=[target]))
    assert storescu(node.port, files).returncode == 0
    url = f"{orthanc.url}/dicom-web/studies"
    expected = f"401 Unauthorized from {url}: check user 'router' and the password in {secret}"
    assert wait_until(lambda: expected in last_errors(node.config_path), timeout=20), last_errors(
        node.config_path
    )
    assert node.logged("held for", timeout=5) and expected in node.log()
    assert not uids & set(dicomweb_uids(orthanc))
    held = open_jobs(node.config_path)  # held, not dead letters (running: a retry right now)
    assert sum(held.values()) == 5 and set(held) <= {"pending", "running"}, held

    secret.write_text(PASSWORD + "\n")  # fixed in place: no reload, no restart
    assert wait_until(lambda: not open_jobs(node.config_path), timeout=30), node.log_tail(20)
    assert uids <= set(dicomweb_uids(orthanc))
    assert node.stop() == 0
