"""The cluster's acceptance: three nodes behind HAProxy, one PostgreSQL, one SeaweedFS S3.

DCMTK storescu sends INSTANCES instances on six associations through HAProxy; one node
is killed with SIGKILL mid-stream, while it has a backlog; storescu sends again what
was not acknowledged. Then every acknowledged instance is in S3 exactly once with the
bytes sent, the forward destination has each at least once, and the killed node's
backlog was finished by the others (shared spool, its leases expired).
"""

from __future__ import annotations

import io
import os
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.corpus import copies_with_new_uids, sop_instance_uid
from tests.forward_support import StoreSCP
from tests.haproxy import HAProxy
from tests.postgres import PostgresServer
from tests.processes import NODELAY, free_port
from tests.seaweed import SeaweedS3
from tests.support import NodeProcess, dicom_node, require_tool, wait_until, write_config

# 600 in the issue; 300 keeps this test near 30 s on a loaded 2-core machine (the
# machinery is the same: six associations, a node killed mid-stream, retries).
INSTANCES = 300
ASSOCIATIONS = 6
LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


class ForkingStoreSCP(StoreSCP):
    """storescp --fork: three nodes forward to it at once."""

    own_session = True


def node_config(
    folder: Path, name: str, dsn_file: Path, seaweed: SeaweedS3, bucket: str, pacs: int
) -> tuple[NodeProcess, int]:
    """A node of the cluster, not started, and its metrics port."""
    port, metrics = free_port(), free_port()
    sections: dict[str, object] = {
        "node": {
            "ae_title": "DICOMNODE",
            "host": "127.0.0.1",
            "port": port,
            "data_dir": str(folder / name),
            "name": name,
            "max_pdu": 0,
        },
        "limits": {"min_free_space": 0},
        "metrics": {"address": f"127.0.0.1:{metrics}"},
        "queue": {
            "backend": "postgresql",
            "dsn_file": str(dsn_file),
            "lease": 3,
            "shared_spool": True,
        },
        "storage": [
            {
                "name": "objects",
                "kind": "s3",
                "bucket": bucket,
                "endpoint_url": seaweed.endpoint_url,
                "layout": LAYOUT,
                "duplicates": "keep",
                "credentials_file": str(seaweed.credentials_file),
            }
        ],
        "destination": [
            {
                "name": "pacs",
                "ae_title": "STORESCP",
                "host": "127.0.0.1",
                "port": pacs,
                "max_associations": 2,
                "retry": {"initial_delay": 0.5, "max_delay": 2},
            }
        ],
    }
    config = write_config(folder / f"{name}.toml", sections)
    return NodeProcess(config, port, env={"JOURNAL_STREAM": None}), metrics


class Sender:
    """One storescu association through HAProxy, its log read for what was acknowledged."""

    def __init__(self, port: int, files: list[Path], log: Path) -> None:
        self.files = files
        self.log = log
        exe = require_tool("storescu")
        self.process = subprocess.Popen(
            [exe, "-v", "-aec", "DICOMNODE", "-aet", "MODALITY", "127.0.0.1", str(port)]
            + [str(f) for f in files],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **NODELAY},
        )

    def acknowledged(self) -> set[Path]:
        """Files whose C-STORE got Success: 'Sending file: X' then 'Received Store Response
        (Success)' in storescu's verbose log."""
        done, current = set(), None
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("I: Sending file: "):
                current = Path(line.removeprefix("I: Sending file: ").strip())
            elif line.startswith("I: Received Store Response (Success)") and current:
                done.add(current)
        return done


def same_instance(stored: bytes, sent: Path) -> bool:
    """The object holds what storescu sent: every element equal, Pixel Data byte for byte,
    and the pixels decode the same. (storescu drops Data Set Trailing Padding, so the file's
    own bytes are not what went over the wire.)"""
    got, source = pydicom.dcmread(io.BytesIO(stored)), pydicom.dcmread(sent)
    if (0xFFFC, 0xFFFC) in source:
        del source[0xFFFC, 0xFFFC]
    return (
        got == source
        and got.PixelData == source.PixelData
        and bool((got.pixel_array == source.pixel_array).all())
    )


def count(dsn: str, query: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(query).fetchone()
        return int(row[0]) if row else 0


@pytest.fixture
def cluster_dsn(postgres_server: PostgresServer, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    dsn = postgres_server.new_schema()
    dsn_file = tmp_path / "pg.dsn"
    dsn_file.write_text(dsn)
    dsn_file.chmod(0o600)
    yield dsn, dsn_file


def test_three_nodes_behind_haproxy_lose_nothing_when_one_is_killed(
    tmp_path: Path,
    cluster_dsn: tuple[str, Path],
    seaweed: SeaweedS3,
) -> None:
    dsn, dsn_file = cluster_dsn
    # A bucket of its own: "exactly once" counts every object, and the session's bucket
    # holds other tests' objects of the same study.
    bucket = f"cluster-{uuid.uuid4().hex[:12]}"
    seaweed.make_bucket(bucket)
    files = copies_with_new_uids(
        Path(get_testdata_file("CT_small.dcm")), tmp_path / "in", INSTANCES
    )
    pacs = ForkingStoreSCP(tmp_path / "pacs", "STORESCP", "--fork").start()
    made = {n: node_config(tmp_path, n, dsn_file, seaweed, bucket, pacs.port) for n in "abc"}
    nodes = {name: node for name, (node, _metrics) in made.items()}
    senders: list[Sender] = []
    try:
        for node in nodes.values():
            node.start(wait=False)
        for node in nodes.values():
            node.wait_ready(60)
        with HAProxy(tmp_path / "haproxy", [(n, p.port) for n, p in nodes.items()]) as haproxy:
            haproxy.wait_for(dict.fromkeys(nodes, "UP"))
            shares = [files[i::ASSOCIATIONS] for i in range(ASSOCIATIONS)]
            senders = [
                Sender(haproxy.port, share, tmp_path / f"storescu-{i}.log")
                for i, share in enumerate(shares)
            ]
            victim = nodes["b"]
            # Mid-stream, while the victim holds work it has acknowledged but not finished.
            backlog_query = "SELECT COUNT(*) FROM jobs WHERE node = 'b' AND state <> 'done'"
            acknowledged = lambda: sum(len(s.acknowledged()) for s in senders)  # noqa: E731
            assert wait_until(
                lambda: acknowledged() >= INSTANCES // 4 and count(dsn, backlog_query) > 0,
                timeout=60,
                interval=0.05,
            ), "the victim never had a backlog to lose"
            backlog = count(dsn, backlog_query)
            victim.kill()
            haproxy.wait_for({"b": "DOWN"}, timeout=15)
            for sender in senders:
                sender.process.wait(120)
            # storescu sends again what was not acknowledged (on the surviving nodes).
            acked: set[Path] = set().union(*(s.acknowledged() for s in senders))
            broken = sum(1 for s in senders if s.process.returncode != 0)
            for attempt in range(3):
                missing = [f for f in files if f not in acked]
                if not missing:
                    break
                again = Sender(haproxy.port, missing, tmp_path / f"storescu-retry-{attempt}.log")
                again.process.wait(120)
                acked |= again.acknowledged()
            assert acked == set(files), f"{len(files) - len(acked)} never acknowledged"
            assert broken >= 1, "no association was on the killed node"

            # The survivors finish everything, the victim's backlog too, once its leases expire.
            assert wait_until(lambda: count(dsn, "SELECT COUNT(*) FROM jobs") == 0, 120), count(
                dsn, "SELECT COUNT(*) FROM jobs"
            )
            status = dicom_node("queue", "status", "-c", str(nodes["a"].config_path))
            assert status.returncode == 0, status.stderr
            with urllib.request.urlopen(f"http://127.0.0.1:{made['a'][1]}/metrics") as scrape:
                metrics = scrape.read().decode()
        uids = {sop_instance_uid(f): f for f in files}
        client = seaweed.client()
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys += [item["Key"] for item in page.get("Contents", [])]
        assert all(key.startswith(f"{study}/") for key in keys), keys[:3]
        stored = [key.rsplit("/", 1)[1].removesuffix(".dcm") for key in keys]
        assert sorted(stored) == sorted(uids), "S3 does not hold each instance exactly once"
        assert count(dsn, "SELECT COUNT(*) FROM stored") == INSTANCES
        mismatched = [
            key
            for key in keys
            if not same_instance(
                client.get_object(Bucket=bucket, Key=key)["Body"].read(),
                uids[key.rsplit("/", 1)[1].removesuffix(".dcm")],
            )
        ]
        assert mismatched == [], f"{len(mismatched)} objects differ from what was sent"
        forwarded = {p.name.split(".", 1)[1] for p in pacs.files()}
        assert set(uids) <= forwarded, f"{len(set(uids) - forwarded)} never forwarded"

        print(f"\nvictim's backlog when killed: {backlog} jobs; {broken} associations broke")
        assert backlog > 0
        lines = status.stdout.splitlines()
        assert any(line.split()[:1] == ["b"] for line in lines), status.stdout
        assert 'dicom_node_instances_received_total{node="a",status="success"}' in metrics
    finally:
        for sender in senders:
            if sender.process.poll() is None:
                sender.process.kill()
        for node in nodes.values():
            node.kill()
        pacs.kill()
