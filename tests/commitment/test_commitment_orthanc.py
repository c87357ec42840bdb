"""Storage Commitment with Orthanc in both roles, read from Orthanc's own REST API.

- As SCU: Orthanc sends 20 instances to the node, then asks for commitment of those 20 and
  one it never sent; its storage commitment report (GET /storage-commitment/{id}) must say
  20 committed and 1 failed with 0x0112.
- As SCP: a destination with commitment = true. Orthanc deletes each instance the first time
  it receives it over DICOM (a Lua OnStoredInstance), so its report says that instance
  failed: the node sends it again, and completes the job only when Orthanc commits it.
  Orthanc runs the Lua callback on its own thread after the C-STORE; its storage commitment
  lookup runs later still (the N-ACTION follows our durable commit, then Orthanc's job
  engine), and it won the race in every run so far (12 runs, load 8-11 on 2 cores).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.corpus import CT_SMALL, copies_with_new_uids, sop_instance_uid
from tests.orthanc import Orthanc
from tests.support import NodeProcess, base_config, configured_node, free_port, storescu, wait_until

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
NEVER_SENT = "1.2.826.0.1.3680043.8.498.1.999"

# The first DICOM store of each SOP Instance UID is deleted right away: "lost" by the PACS
# after it answered C-STORE Success (Mirth #4266's case), which only commitment can tell.
FORGETFUL_LUA = """
seen = {}
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin["RequestOrigin"] == "DicomProtocol" then
    local uid = tags["SOPInstanceUID"]
    if seen[uid] == nil then
      seen[uid] = true
      RestApiDelete("/instances/" .. instanceId)
    end
  end
end
"""


class ForgetfulOrthanc(Orthanc):
    def __init__(self, folder: Path, **options: Any) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.lua = folder / "forgetful.lua"
        self.lua.write_text(FORGETFUL_LUA)
        super().__init__(folder, **options)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "LuaScripts": [str(self.lua)]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Orthanc]]:
    root = tmp_path_factory.mktemp("commitment-orthanc")
    node_port = free_port()
    orthanc = ForgetfulOrthanc(
        root / "orthanc", modalities={"node": ["DICOMNODE", "127.0.0.1", node_port]}
    ).start()

    def edit(sections: dict[str, object]) -> None:
        sections["destination"] = [
            {
                "name": "orthanc",
                "ae_title": orthanc.ae_title,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "commitment": True,
                "retry": {"initial_delay": 0.5, "max_delay": 1.0, "max_attempts": 4},
            }
        ]
        # What Orthanc sends stays here; what a modality sends goes on to Orthanc.
        sections["route"] = [
            {"match": {"CallingAETitle": "ORTHANC"}, "storage": ["archive"]},
            {"match": {"CallingAETitle": "MODALITY"}, "destinations": ["orthanc"]},
        ]
        sections["commitment"] = {
            "enabled": True,
            "when": "stored",
            "report_timeout": 60,
            "requestor": [
                {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}
            ],
        }

    folder = root / "node"
    node = configured_node(folder, edit, config=base_config(folder, node_port)).start()
    yield node, orthanc
    node.kill()
    orthanc.stop()


def _commitment_report(orthanc: Orthanc, path: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def finished() -> bool:
        found.update(orthanc.get(path))
        return found.get("Status") != "Pending"

    assert wait_until(finished, timeout=60, interval=0.25), found
    return found


def test_orthanc_as_scu_gets_20_committed_and_1_failed_with_0112(
    setup: tuple[NodeProcess, Orthanc], tmp_path: Path
) -> None:
    node, orthanc = setup
    files = copies_with_new_uids(CT_SMALL, tmp_path, 20)
    ids = [orthanc.upload(path) for path in files]
    job = orthanc.store_to("node", ids)
    assert job.get("FailedInstancesCount", 0) == 0, job
    instances = [
        {"SOPClassUID": tags["SOPClassUID"], "SOPInstanceUID": tags["SOPInstanceUID"]}
        for tags in (orthanc.get(f"/instances/{i}/simplified-tags") for i in ids)
    ]
    body = {
        "DicomInstances": [
            *instances,
            {"SOPClassUID": CT_IMAGE_STORAGE, "SOPInstanceUID": NEVER_SENT},
        ]
    }
    answer = orthanc.post(
        "/modalities/node/storage-commitment", json.dumps(body).encode(), "application/json"
    )
    report = _commitment_report(orthanc, answer["Path"])
    assert report["Status"] == "Failure", report
    assert sorted(s["SOPInstanceUID"] for s in report["Success"]) == sorted(
        i["SOPInstanceUID"] for i in instances
    )
    assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in report["Failures"]] == [
        (NEVER_SENT, 0x0112)
    ]
    assert re.search(
        rf"Transaction UID {re.escape(answer['ID'])} delivered to 'ORTHANC' on a new association",
        node.log(),
    ), node.log_tail(30)


def test_orthanc_as_scp_keeps_the_spool_copy_until_committed_and_gets_a_lost_instance_again(
    setup: tuple[NodeProcess, Orthanc], tmp_path: Path
) -> None:
    node, orthanc = setup
    files = copies_with_new_uids(CT_SMALL, tmp_path, 2)
    uids = [sop_instance_uid(path) for path in files]
    result = storescu(node.port, files, aet="MODALITY")
    assert result.returncode == 0, result.stderr
    spool = node.config_path.parent / "data" / "spool"

    def committed() -> bool:
        log = node.log()
        return all(
            f"forwarded SOP Instance UID {uid} to 'orthanc': committed by" in log for uid in uids
        )

    assert wait_until(committed, timeout=60), node.log_tail(40)
    log = node.log()
    for uid in uids:
        # Orthanc answered the first C-STORE with Success, lost it, and said so in its report.
        failed = log.index(
            f"SOP Instance UID {uid} for 'orthanc': 'orthanc' reported it failed: 0x0112"
        )
        done = log.index(f"forwarded SOP Instance UID {uid} to 'orthanc': committed by")
        assert failed < done
    # Sent again after Orthanc had answered its C-STORE with Success: only the spool copy,
    # kept until the report, could be sent. Once committed, nothing needs it.
    assert wait_until(lambda: not list(spool.rglob("*.dcm")), timeout=10)
    stored = {
        orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
        for i in orthanc.instances()
    }
    assert set(uids) <= stored
