"""`dicom-node status`: queue depths, last error per target and recent dead letters, read-only."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pydicom.uid import generate_uid

from node.jobs.jobqueue import SqliteJobQueue
from node.jobs.model import JobKind, JobSpec, ReceivedInstance
from tests.support import base_config, dicom_node, free_port, write_config


def queued_instance(folder: Path, uid: str, size: int = 2_000_000) -> ReceivedInstance:
    """A CT instance as intake records it (the spool file itself is not needed here)."""
    return ReceivedInstance(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae_title="MODALITY",
        called_ae_title="DICOMNODE",
        spool_path=folder / uid,
        size=size,
    )


def status(config: Path) -> subprocess.CompletedProcess[str]:
    return dicom_node("status", "-c", str(config), timeout=60)


def test_status_summarises_queue_errors_and_dead_letters(tmp_path: Path) -> None:
    sections = base_config(tmp_path, free_port())
    sections["destination"] = [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    ]
    config = write_config(tmp_path / "config.toml", sections)
    queue = SqliteJobQueue.open(tmp_path / "data" / "queue.sqlite3")
    jobs = [JobSpec(JobKind.STORE, "archive"), JobSpec(JobKind.FORWARD, "pacs")]
    uids = [generate_uid() for _ in range(3)]
    for uid in uids:
        queue.record_instance(queued_instance(tmp_path, uid), jobs)
    first, second = queue.claim(JobKind.FORWARD, target="pacs", limit=2)
    queue.retry_later(first, "association to PACS@127.0.0.1 refused: connection refused", 60)
    queue.dead_letter(second, "PACS answered 0xA900: dataset does not match SOP class")
    queue.close()

    result = status(config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) <= 24, "more than one screen"
    rows = {tuple(line.split()[:2]): line.split()[2:5] for line in lines if line[:1] in "sf"}
    assert rows[("store", "archive")] == ["3", "0", "0"]
    assert rows[("forward", "pacs")] == ["2", "0", "1"]
    assert lines[0].endswith(": not running")
    assert "spool  3 instances, 6.0 MB waiting" in result.stdout
    assert re.search(r"\n  forward pacs \(\d+ s ago\): PACS answered 0xA900", result.stdout)
    dead = [line for line in lines if uids[1] in line]
    assert len(dead) == 1 and "forward pacs" in dead[0] and "0xA900" in dead[0]


def test_status_without_a_database_says_where_it_looked(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", base_config(tmp_path, free_port()))
    result = status(config)
    assert result.returncode == 1
    assert f"no queue database at {tmp_path / 'data' / 'queue.sqlite3'}" in result.stdout
    assert not (tmp_path / "data").exists(), "status must not create anything"
