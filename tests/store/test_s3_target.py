"""S3 storage targets against a real SeaweedFS: objects at the layout's key, byte for byte,
multipart above the threshold, conditional puts for the duplicates policy, checksums, and
the credentials file."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import botocore.exceptions
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from node.config.model import StorageConfig
from node.ingest.spool import Spool
from node.jobs.jobqueue import SqliteJobQueue
from node.jobs.model import JobKind, JobSpec, ReceivedInstance
from node.store import s3 as s3_module
from node.store.s3 import ObjectMismatch, S3StorageTarget
from node.store.targets import Placement
from node.store.workers import StoreWorkers, read_file_header
from tests.seaweed import SeaweedS3
from tests.support import wait_until

LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


def s3_config(seaweed: SeaweedS3, bucket: str, **changes: object) -> StorageConfig:
    values: dict[str, object] = {
        "name": "objects",
        "kind": "s3",
        "bucket": bucket,
        "endpoint_url": seaweed.endpoint_url,
        "layout": LAYOUT,
        "credentials_file": seaweed.credentials_file,
        **changes,
    }
    return StorageConfig(**values)  # type: ignore[arg-type]


def instance_file(folder: Path, extra_bytes: int = 0) -> tuple[Path, pydicom.Dataset]:
    """CT_small with a fresh SOP Instance UID (and `extra_bytes` of private OB data)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if extra_bytes:
        ds.add_new((0x0009, 0x0010), "LO", "DICOM-NODE TEST")
        ds.add_new((0x0009, 0x1001), "OB", os.urandom(extra_bytes))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def key_of(ds: pydicom.Dataset) -> str:
    return f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"


def changed(data: bytes) -> bytes:
    """The same file with its last pixel byte changed: same SOP Instance UID, other bytes."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def staged_copy(source: Path, target: S3StorageTarget) -> Path:
    staged = target.staging_path()
    staged.write_bytes(source.read_bytes())
    return staged


def test_store_workers_put_each_instance_at_its_key_byte_for_byte(
    seaweed: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    target = S3StorageTarget(s3_config(seaweed, bucket), tmp_path / "staging")
    target.prepare()
    queue = SqliteJobQueue.open(tmp_path / "queue.sqlite3")
    spool = Spool(tmp_path / "spool")
    files = [instance_file(tmp_path / "in") for _ in range(3)]
    for path, ds in files:
        spooled = tmp_path / "spool" / path.name
        spooled.parent.mkdir(exist_ok=True)
        spooled.write_bytes(path.read_bytes())
        queue.record_instance(
            ReceivedInstance(
                ds.SOPInstanceUID,
                ds.SOPClassUID,
                ds.file_meta.TransferSyntaxUID,
                "CT",
                "N",
                spooled,
                spooled.stat().st_size,
            ),
            [JobSpec(JobKind.STORE, "objects")],
        )
    workers = StoreWorkers(queue, spool, {"objects": target})
    workers.start()
    try:
        assert wait_until(lambda: queue.spool_paths() == set(), timeout=60)
    finally:
        workers.stop()
    client = seaweed.client()
    for path, ds in files:
        body = client.get_object(Bucket=bucket, Key=key_of(ds))["Body"].read()
        assert body == path.read_bytes()
        assert queue.stored_path("objects", ds.SOPInstanceUID) == Path(f"s3:/{bucket}/{key_of(ds)}")
    assert queue.spool_paths() == set() and list((tmp_path / "spool").iterdir()) == []
    assert list(target.staging.iterdir()) == [], "a staged file was left behind"
    queue.close()


def test_large_instances_go_up_in_parts_and_appear_whole(
    seaweed: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    target = S3StorageTarget(
        s3_config(seaweed, bucket),
        tmp_path / "staging",
        multipart_threshold=6 * 1024 * 1024,
        part_size=5 * 1024 * 1024,
    )
    path, ds = instance_file(tmp_path, extra_bytes=12 * 1024 * 1024)
    placed = target.commit(staged_copy(path, target), read_file_header(path))
    assert placed.placement is Placement.STORED
    assert placed.size == path.stat().st_size  # what the stored-bytes metric counts
    head = seaweed.client().head_object(Bucket=bucket, Key=key_of(ds))
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]
    body = seaweed.client().get_object(Bucket=bucket, Key=key_of(ds))["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(path.read_bytes()).digest()


def test_keep_two_nodes_storing_one_instance_at_once_write_one_object(
    seaweed: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    """keep: If-None-Match: * makes the second put fail with 412: the first object stays."""
    config = s3_config(seaweed, bucket, duplicates="keep")
    nodes = [S3StorageTarget(config, tmp_path / f"node{i}") for i in range(2)]
    path, ds = instance_file(tmp_path)
    other = changed(path.read_bytes())
    sources = [path.read_bytes(), other]
    placements: list[Placement] = []
    barrier = threading.Barrier(2)

    def store(index: int) -> None:
        staged = nodes[index].staging_path()
        staged.write_bytes(sources[index])
        barrier.wait()
        placements.append(nodes[index].commit(staged, read_file_header(path)).placement)

    threads = [threading.Thread(target=store, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(placements) == sorted([Placement.STORED, Placement.KEPT_EXISTING])
    body = seaweed.client().get_object(Bucket=bucket, Key=key_of(ds))["Body"].read()
    assert body in sources
    listed = seaweed.client().list_objects_v2(Bucket=bucket, Prefix=key_of(ds))["Contents"]
    assert [item["Key"] for item in listed] == [key_of(ds)]


def test_overwrite_replaces_the_object(seaweed: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    target = S3StorageTarget(s3_config(seaweed, bucket), tmp_path / "staging")
    path, ds = instance_file(tmp_path)
    first = target.commit(staged_copy(path, target), read_file_header(path))
    new = changed(path.read_bytes())
    staged = target.staging_path()
    staged.write_bytes(new)
    second = target.commit(staged, read_file_header(path), previous=first.path)
    assert (first.placement, second.placement) == (Placement.STORED, Placement.OVERWRITTEN)
    body = seaweed.client().get_object(Bucket=bucket, Key=key_of(ds))["Body"].read()
    assert body == new


def test_bytes_changed_on_the_way_are_never_taken_as_stored(
    seaweed: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    """Both checks: the server refuses a body that does not match its Content-MD5
    (BadDigest), and an object whose ETag is not the MD5 of what we staged is an error."""
    target = S3StorageTarget(s3_config(seaweed, bucket), tmp_path / "staging")
    path, _ds = instance_file(tmp_path)
    put = target.client.put_object

    def flip_a_byte(**request: object) -> object:
        body = bytearray(request["Body"])  # type: ignore[arg-type]
        body[-1] ^= 0xFF
        return put(**{**request, "Body": bytes(body)})

    target.client.put_object = flip_a_byte
    with pytest.raises(botocore.exceptions.ClientError, match="BadDigest"):
        target.commit(staged_copy(path, target), read_file_header(path))

    def flip_and_rehash(**request: object) -> object:
        body = bytearray(request["Body"])  # type: ignore[arg-type]
        body[-1] ^= 0xFF
        digest = s3_module._content_md5(s3_module._md5(bytes(body)))
        return put(**{**request, "Body": bytes(body), "ContentMD5": digest})

    target.client.put_object = flip_and_rehash
    with pytest.raises(ObjectMismatch, match="is not the MD5"):
        target.commit(staged_copy(path, target), read_file_header(path))


def test_the_credentials_file_is_what_signs(
    seaweed: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.credentials"
    wrong.write_text("[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n")
    target = S3StorageTarget(s3_config(seaweed, bucket, credentials_file=wrong), tmp_path / "s")
    path, _ds = instance_file(tmp_path)
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        target.commit(staged_copy(path, target), read_file_header(path))
    assert refused.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "AccessDenied")


def test_the_spool_file_itself_is_uploaded_and_kept(
    seaweed: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    """Stored as received, the file handed over is the spool file: it must stay (its other
    jobs, and the spool's own cleanup, need it)."""
    target = S3StorageTarget(s3_config(seaweed, bucket), tmp_path / "staging")
    path, ds = instance_file(tmp_path / "spool")
    header = read_file_header(path)
    placed = target.place(path, target.destination_for(header), keep_source=True)
    assert placed.placement is Placement.STORED and path.exists()
    body = seaweed.client().get_object(Bucket=bucket, Key=key_of(ds))["Body"].read()
    assert body == path.read_bytes()
