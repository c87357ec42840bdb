"""A running node with coerced and de-identified targets, Orthanc as the destination.

One node, one Orthanc, for the module: a study sent in two associations, then the node
restarted and one instance re-sent and one more sent. Orthanc's REST API shows the
coerced study (PatientID prefixed, its own UIDs) and the de-identified one (one study,
new UIDs, the keyed map of the originals); the storage targets hold their own views
while the as-received target holds the received bytes; an instance that may carry
burned-in text is a dead letter for the de-identifying targets, with the reason shown
by `dicom-node queue status`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from node.shape.uidmap import UidMap
from tests.corpus import copies_with_new_uids, dataset_bytes, find
from tests.forward_support import destination, forwarding_config, queue_cli
from tests.orthanc import Orthanc, dicomweb_plugin
from tests.support import NodeProcess, configured_node, free_port, storescu, wait_until

SECRET = b"a site's UID key, 32 bytes long!"
WEB_SECRET = b"another project's key, not linked"
CALLING = "MODALITY1"


@dataclass
class Run:
    node: NodeProcess
    orthanc: Orthanc
    folder: Path
    study: list[Path]  # the CT instances sent, in order
    refused: Path  # an US instance without Burned In Annotation
    config: Path


def _config(folder: Path, port: int, orthanc: Orthanc, key: Path) -> dict[str, object]:
    deidentify = {"profile": "basic", "uid_secret_file": str(key)}
    web_key = folder / "web.key"
    web_key.write_bytes(WEB_SECRET)
    os.chmod(web_key, 0o600)
    web = {
        "name": "web",  # STOW-RS: the same view, under another project's key
        "protocol": "dicomweb",
        "url": f"{orthanc.url}/dicom-web",
        "idle_timeout": 2.0,
        "retry": {"initial_delay": 1, "max_delay": 5},
        "deidentify": {"profile": "basic", "uid_secret_file": str(web_key)},
    }
    pacs = destination(
        "pacs",
        "ORTHANC",
        orthanc.dicom_port,
        coerce={
            "set": {"PatientID": "A-{PatientID}", "InstitutionName": "{CallingAETitle} site"},
            "delete": ["OtherPatientIDsSequence"],
        },
    )
    research = destination(
        "research",
        "ORTHANC",
        orthanc.dicom_port,
        transfer_syntaxes=["JPEGLSLossless"],  # de-identified and encoded in one step
        deidentify=deidentify,
    )
    config = forwarding_config(folder, port, [pacs, research, web])
    config["storage"] = [
        {"name": "archive", "path": str(folder / "archive")},
        {"name": "research", "path": str(folder / "research"), "deidentify": deidentify},
    ]
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    folder = tmp_path_factory.mktemp("shape-node")
    key = folder / "uid.key"
    key.write_bytes(SECRET)
    os.chmod(key, 0o600)
    study = copies_with_new_uids(find("CT_small.dcm"), folder / "study", 5)
    refused = find("US1_UNCR.dcm")
    port = free_port()
    with Orthanc(folder / "orthanc", plugins=(dicomweb_plugin(),)) as orthanc:
        node = configured_node(folder, config=_config(folder, port, orthanc, key))
        with node:
            for batch in (study[:2], [*study[2:4], refused]):  # two associations
                assert storescu(port, batch, aet=CALLING).returncode == 0
            assert wait_until(lambda: orthanc.count() == 13, timeout=60), node.log()
            assert wait_until(lambda: _failed(node.config_path) >= 3, timeout=30), node.log()
        with node:  # a restart: the same key, so the same UIDs
            assert storescu(port, [study[0], study[4]], aet=CALLING).returncode == 0
            assert wait_until(lambda: _stored(folder / "research") == 5, timeout=60), node.log()
            assert wait_until(lambda: _forwarded_all(orthanc), timeout=60), node.log()
            yield Run(node, orthanc, folder, study, refused, node.config_path)


def _stored(root: Path) -> int:
    return len([p for p in root.rglob("*.dcm") if ".incoming" not in p.parts])


def _failed(config: Path) -> int:
    return queue_cli(config, "status").stdout.count(" failed ")


def _forwarded_all(orthanc: Orthanc) -> bool:
    # 5 coerced CT + 1 US to "pacs", 5 de-identified CT to "research" and 5 to "web";
    # the re-sent instance replaces itself in each view (same SOP Instance UID each).
    return orthanc.count() == 16


def _studies(orthanc: Orthanc) -> list[dict[str, object]]:
    return [orthanc.get(f"/studies/{sid}") for sid in orthanc.get("/studies")]


def test_orthanc_has_the_coerced_study_with_patient_id_prefixed(run: Run) -> None:
    source = dcmread(run.study[0])
    coerced = [
        s
        for s in _studies(run.orthanc)
        if s["MainDicomTags"]["StudyInstanceUID"] == source.StudyInstanceUID  # type: ignore[index]
    ]
    assert len(coerced) == 1
    assert coerced[0]["PatientMainDicomTags"]["PatientID"] == f"A-{source.PatientID}"  # type: ignore[index]
    instances = run.orthanc.get(f"/studies/{coerced[0]['ID']}/instances")
    assert len(instances) == 5
    tags = run.orthanc.get(f"/instances/{instances[0]['ID']}/simplified-tags")
    assert tags["InstitutionName"] == f"{CALLING} site"
    assert "OtherPatientIDsSequence" not in tags


def test_orthanc_has_one_deidentified_study_with_the_keyed_map_of_the_uids(run: Run) -> None:
    uids = UidMap(SECRET)
    source = dcmread(run.study[0])
    mapped_study = uids.remap(source.StudyInstanceUID)
    deidentified = [
        s
        for s in _studies(run.orthanc)
        if s["MainDicomTags"]["StudyInstanceUID"] == mapped_study  # type: ignore[index]
    ]
    assert len(deidentified) == 1, "one study across two associations and a restart"
    assert deidentified[0]["PatientMainDicomTags"]["PatientID"] != source.PatientID  # type: ignore[index]
    instances = run.orthanc.get(f"/studies/{deidentified[0]['ID']}/instances")
    got = {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}
    assert got == {uids.remap(dcmread(p).SOPInstanceUID) for p in run.study}
    series = {i["ParentSeries"] for i in instances}
    assert len(series) == 1
    tags = run.orthanc.get(f"/instances/{instances[0]['ID']}/simplified-tags")
    assert tags["PatientIdentityRemoved"] == "YES"
    assert tags["PatientName"] == ""  # Z in the Basic Profile
    assert len(_studies(run.orthanc)) == 4  # coerced CT, two de-identified CT, the US


def test_a_dicomweb_destination_gets_its_own_deidentified_view(run: Run) -> None:
    uids = UidMap(WEB_SECRET)
    source = dcmread(run.study[0])
    study = uids.remap(source.StudyInstanceUID)
    found = run.orthanc.get(f"/dicom-web/studies?StudyInstanceUID={study}")
    assert len(found) == 1
    instances = run.orthanc.get(f"/dicom-web/studies/{study}/instances")
    got = {i["00080018"]["Value"][0] for i in instances}
    assert got == {uids.remap(dcmread(p).SOPInstanceUID) for p in run.study}
    assert study != UidMap(SECRET).remap(source.StudyInstanceUID)  # another key: unlinked


def test_the_deidentified_storage_has_its_own_view_and_the_same_pixels(run: Run) -> None:
    uids = UidMap(SECRET)
    stored = [p for p in (run.folder / "research").rglob("*.dcm") if ".incoming" not in p.parts]
    by_uid = {dcmread(p).SOPInstanceUID: dcmread(p) for p in stored}
    for path in run.study:
        source = dcmread(path)
        copy = by_uid[uids.remap(source.SOPInstanceUID)]
        assert copy.StudyInstanceUID == uids.remap(source.StudyInstanceUID)
        assert copy.PixelData == source.PixelData
        assert copy.PatientIdentityRemoved == "YES"
        assert not [t for t in list(copy.keys()) if t.is_private]


def test_the_as_received_storage_keeps_the_bytes_as_received(run: Run) -> None:
    stored = [p for p in (run.folder / "archive").rglob("*.dcm") if ".incoming" not in p.parts]
    sent = {str(dcmread(p).SOPInstanceUID): dataset_bytes(p) for p in [*run.study, run.refused]}
    assert len(stored) == len(sent)
    for path in stored:
        kept, original = dataset_bytes(path), sent[str(dcmread(path).SOPInstanceUID)]
        # storescu leaves out Data Set Trailing Padding (FFFC,FFFC): the rest is as sent.
        assert original.startswith(kept), path.name
        assert original[len(kept) :][:4] in (b"", b"\xfc\xff\xfc\xff"), path.name


def test_burned_in_annotation_is_a_dead_letter_with_its_reason_in_queue_status(run: Run) -> None:
    status = queue_cli(run.config, "status")
    assert status.returncode == 0, status.stderr
    lines = [line for line in status.stdout.splitlines() if " failed " in line]
    assert {line.split()[1] for line in lines} == {"research", "web"}, status.stdout
    assert len(lines) == 3, status.stdout  # the storage target and two destinations
    assert status.stdout.count("Burned In Annotation is missing and modality US") >= 3


def test_the_log_says_which_profile_and_coercion_applied(run: Run) -> None:
    log = run.node.log()
    assert "PS3.15 Basic Profile (2026c)" in log
    assert "coerce set PatientID, InstitutionName; delete OtherPatientIDsSequence" in log
    mapped = UidMap(SECRET).remap(dcmread(run.study[0]).SOPInstanceUID)
    assert f"PS3.15 Basic Profile (2026c), stored as SOP Instance UID {mapped}" in log
