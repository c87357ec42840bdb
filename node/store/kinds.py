"""Which storage target a [[storage]] table makes: a folder (the default) or an S3 bucket.

boto3 is imported only when an `s3` target is configured, so a node storing to disk
needs no S3 library.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from node.config.model import StorageConfig
from node.store.targets import StorageTarget

S3_STAGING_DIR = "s3-staging"
# Store worker threads: 4 keep a local disk busy; an object store is a network round trip
# per PUT that a thread only waits for (bench/scale.py: 4 threads stored about half as
# fast as the node received), so with one there are more.
STORE_THREADS = 4
STORE_THREADS_WITH_S3 = 16


def local_root(config: StorageConfig, data_dir: Path) -> Path:
    """The local folder a target writes: its path, or an S3 target's staging folder."""
    if config.kind == "s3":
        return data_dir / S3_STAGING_DIR / config.name
    assert config.path is not None, "config checks: a filesystem target has a path"
    return config.path


def storage_target(config: StorageConfig, data_dir: Path) -> StorageTarget:
    if config.kind == "s3":
        from node.store.s3 import S3StorageTarget

        return S3StorageTarget(config, local_root(config, data_dir))
    return StorageTarget(config)


def storage_targets(configs: Iterable[StorageConfig], data_dir: Path) -> dict[str, StorageTarget]:
    return {config.name: storage_target(config, data_dir) for config in configs}


def store_threads(configs: Iterable[StorageConfig]) -> int:
    """How many store worker threads the configured targets want."""
    if any(config.kind == "s3" for config in configs):
        return STORE_THREADS_WITH_S3
    return STORE_THREADS
