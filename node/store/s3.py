"""S3-compatible storage targets (`kind = "s3"`): each instance becomes one object.

The store workers stage an instance as for a folder (a hard link to the spool file, or a
transcoded copy) in a local staging folder under data_dir, then `commit` uploads it:
- under the key the layout renders (the same sanitised template as a folder's path);
- in one PUT, or as a multipart upload above MULTIPART_THRESHOLD; either way the object
  appears whole or not at all (a multipart upload is visible only once completed, and a
  failed one is aborted);
- with the checksums verified twice: each request carries the MD5 of its body, which the
  server checks before it stores anything (BadDigest otherwise), and the ETag it answers
  is compared with the MD5 we computed (for a multipart object, the MD5 of the parts'
  MD5s, "-N"). An ETag that is not an MD5 (SSE-KMS, SSE-C) is not compared;
- with the duplicates policy as a conditional put: `keep` (and `reject`, which intake
  already enforces) send `If-None-Match: *`, so of two nodes storing the same SOP
  Instance UID at once exactly one object is written and the other sees 412 and keeps
  it; `overwrite` replaces the object.

The stored index records `s3:/BUCKET/KEY` as the instance's path.

Credentials: `credentials_file` is an AWS shared-credentials file (its [default] profile);
without it boto3's usual chain applies (environment, config files, instance roles).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
import botocore.credentials
import botocore.exceptions
from botocore.config import Config as BotoConfig
from pydicom.dataset import Dataset

from node.config.model import StorageConfig
from node.store.targets import PlacedInstance, Placement, StorageTarget

log = logging.getLogger("node.store.s3")

# Above this an instance goes up in parts (S3's smallest part is 5 MiB, its largest PUT 5 GiB).
MULTIPART_THRESHOLD = 64 * 1024 * 1024
PART_SIZE = 16 * 1024 * 1024
_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})(-\d+)?"?$')


class ObjectMismatch(OSError):
    """The object the server holds is not the bytes we sent (its ETag says so)."""


def load_credentials(path: Path) -> botocore.credentials.Credentials:
    """The [default] profile of an AWS shared-credentials file, as boto3 reads it."""
    provider = botocore.credentials.SharedCredentialProvider(
        creds_filename=str(path), profile_name="default"
    )
    credentials = provider.load()
    if credentials is None:
        raise ValueError(f"{path}: no [default] aws_access_key_id and aws_secret_access_key")
    return credentials


def make_client(config: StorageConfig) -> Any:
    """A thread-safe boto3 S3 client for one target (shared by its store workers)."""
    options: dict[str, Any] = {"region_name": config.region}
    if config.endpoint_url:
        options["endpoint_url"] = config.endpoint_url
    if config.credentials_file is not None:
        credentials = load_credentials(config.credentials_file)
        options.update(
            aws_access_key_id=credentials.access_key,
            aws_secret_access_key=credentials.secret_key,
            aws_session_token=credentials.token,
        )
    boto = BotoConfig(
        # An S3-compatible server on its own host name rarely has virtual-host buckets.
        s3={"addressing_style": "path" if config.endpoint_url else "auto"},
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=16,
    )
    return boto3.session.Session().client("s3", config=boto, **options)


def locator(bucket: str, key: str) -> Path:
    """The stored index's path for an object."""
    return Path(f"s3:/{bucket}/{key}")


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def _content_md5(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3StorageTarget(StorageTarget):
    """One [[storage]] with kind = "s3": objects in `bucket` at the layout's keys."""

    def __init__(
        self,
        config: StorageConfig,
        staging_root: Path,
        *,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
    ) -> None:
        """staging_root: a local folder for staged files (data_dir/s3-staging/NAME)."""
        super().__init__(config, root=staging_root)
        self.bucket = config.bucket
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.client = make_client(config)

    def prepare(self, clean: bool = True) -> None:
        super().prepare(clean)
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            # Not fatal: store jobs wait and retry until the bucket is reachable.
            log.error("storage %r: bucket %r is not reachable yet: %s", self.name, self.bucket, exc)

    def key_for(self, header: Dataset) -> str:
        return self.layout.render(header).as_posix()

    places_locally = False

    def destination_for(self, header: Dataset) -> Path:
        return locator(self.bucket, self.key_for(header))

    def destination_from(self, texts: Mapping[str, str]) -> Path | None:
        """The object from header values recorded at intake; None if the layout needs one
        that was not recorded (then the file's header is read)."""
        if not all(keyword in texts for keyword in self.layout.keywords):
            return None
        return locator(self.bucket, self.layout.render_values(texts).as_posix())

    def commit(self, staged: Path, header: Dataset, previous: Path | None = None) -> PlacedInstance:
        """Upload a staged file to its layout key under the duplicates policy, then drop it."""
        return self.place(staged, self.destination_for(header), previous)

    def place(
        self,
        staged: Path,
        final: Path,
        previous: Path | None = None,
        *,
        keep_source: bool = False,
        sync: bool = True,
    ) -> PlacedInstance:
        """Upload `staged` to the object `final` names (a locator from destination_for).

        keep_source: `staged` is the spool file itself, left in place. There is no folder
        to fsync (sync is for folders): the object is durable once the PUT succeeded."""
        try:
            size = staged.stat().st_size
            key = self._key_of(final)
            elsewhere = self._stored_elsewhere_key(previous, key)
            if elsewhere is not None and self.duplicates != "overwrite":
                return PlacedInstance(
                    locator(self.bucket, elsewhere), Placement.KEPT_EXISTING, size=0
                )
            placement = self._upload(staged, key)
            if placement is Placement.STORED and previous == final:
                placement = Placement.OVERWRITTEN
            if elsewhere is not None:
                # Only once the new object exists: a crash in between leaves two, never none.
                self.client.delete_object(Bucket=self.bucket, Key=elsewhere)
                placement = Placement.OVERWRITTEN
            written = size if placement is not Placement.KEPT_EXISTING else 0
            return PlacedInstance(final, placement, size=written)
        finally:
            if not keep_source:
                staged.unlink(missing_ok=True)

    def _key_of(self, final: Path) -> str:
        prefix = f"s3:/{self.bucket}/"
        if not str(final).startswith(prefix):
            raise ValueError(f"{final} is not an object of bucket {self.bucket!r}")
        return str(final)[len(prefix) :]

    def _stored_elsewhere_key(self, previous: Path | None, key: str) -> str | None:
        """The key of this instance's earlier object, if it is another key in our bucket."""
        prefix = f"s3:/{self.bucket}/"
        if previous is None or not str(previous).startswith(prefix):
            return None
        earlier = str(previous)[len(prefix) :]
        if earlier == key:
            return None
        try:
            self.client.head_object(Bucket=self.bucket, Key=earlier)
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return earlier

    def _conditions(self) -> dict[str, str]:
        # keep and reject: never replace an object (two nodes, one instance: one object).
        return {} if self.duplicates == "overwrite" else {"IfNoneMatch": "*"}

    def _upload(self, staged: Path, key: str) -> Placement:
        size = staged.stat().st_size
        try:
            if size <= self.multipart_threshold:
                etag, expected = self._put(staged, key)
            else:
                etag, expected = self._put_in_parts(staged, key, size)
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) in ("PreconditionFailed", "412"):
                return Placement.KEPT_EXISTING
            raise
        _check_etag(self.bucket, key, etag, expected)
        return Placement.STORED

    def _put(self, staged: Path, key: str) -> tuple[str, str]:
        body = staged.read_bytes()
        digest = _md5(body)
        response = self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=body,
            ContentMD5=_content_md5(digest),
            ContentType="application/dicom",
            **self._conditions(),
        )
        return str(response.get("ETag", "")), digest.hex()

    def _put_in_parts(self, staged: Path, key: str, size: int) -> tuple[str, str]:
        upload = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType="application/dicom"
        )
        upload_id = upload["UploadId"]
        try:
            parts, digests = [], []
            with staged.open("rb") as source:
                number = 1
                while chunk := source.read(self.part_size):
                    digest = _md5(chunk)
                    part = self.client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                        ContentMD5=_content_md5(digest),
                    )
                    parts.append({"ETag": part["ETag"], "PartNumber": number})
                    digests.append(digest)
                    number += 1
            response = self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **self._conditions(),
            )
        except BaseException:
            self._abort(key, upload_id)
            raise
        expected = f"{_md5(b''.join(digests)).hex()}-{len(digests)}"
        log.debug("uploaded %s in %d parts (%d bytes)", key, len(digests), size)
        return str(response.get("ETag", "")), expected

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            # The parts stay invisible; a bucket lifecycle rule removes them in the end.
            log.warning("could not abort the multipart upload of %s: %s", key, exc)


def _check_etag(bucket: str, key: str, etag: str, expected: str) -> None:
    match = _MD5_ETAG.match(etag)
    if match is None:
        return  # not an MD5 (SSE-KMS, SSE-C): the server checked our Content-MD5 already
    got = match.group(1) + (match.group(2) or "")
    if got != expected:
        raise ObjectMismatch(
            f"s3:/{bucket}/{key}: the server's ETag {etag} is not the MD5 {expected} of the bytes"
            " sent"
        )
