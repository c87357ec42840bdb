"""Storage targets: where an instance lands on disk, and how it gets there atomically.

The path comes from a template of DICOM keywords. Every value is sanitised so
that nothing a sender puts in a tag can lead a file outside the storage root.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydicom.dataset import Dataset

from node.config.model import DuplicatePolicy, StorageConfig
from node.jobs.interface import JobQueue
from node.jobs.model import JobKind, JobSpec
from node.shape import Shaping
from node.shape.build import build_shaping
from node.store.durable import fsync_directory, make_directories
from node.store.layout import LayoutError, parse_layout

STAGING_DIR = ".incoming"


class DuplicateRejected(Exception):
    """The duplicates policy is 'reject' and the SOP Instance UID is already stored."""


class Placement(StrEnum):
    STORED = "stored"
    OVERWRITTEN = "overwritten"
    KEPT_EXISTING = "kept-existing"


@dataclass(frozen=True)
class PlacedInstance:
    path: Path
    placement: Placement


class StorageTarget:
    """One [[storage]] folder: stages files next to their destination, then renames."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self.name = config.name
        self.root = config.path
        self.layout = parse_layout(config.layout)
        self.staging = self.root / STAGING_DIR
        # [storage.coerce] / [storage.deidentify]: this target's own view of each instance.
        self.shaping: Shaping | None = build_shaping(config.coerce, config.deidentify)

    @property
    def stores_as_received(self) -> bool:
        """True when the stored file may be the received bytes (a link or a copy of the
        spool file): no transfer syntax ladder and no header change. A coerced or
        de-identified target never is, whatever its syntax."""
        return not self.config.transfer_syntax and self.shaping is None

    @property
    def duplicates(self) -> DuplicatePolicy:
        return self.config.duplicates

    def prepare(self, clean: bool = True) -> None:
        """Create the staging folder; at start-up, empty it of a crashed run's files.

        Not on a reload (clean=False): workers may be staging into it right now.
        """
        make_directories(self.staging)
        if not clean:
            return
        for stale in self.staging.iterdir():
            stale.unlink(missing_ok=True)

    def staging_path(self) -> Path:
        """A fresh file name on the same filesystem as the final path, so rename is atomic."""
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging / f"{uuid.uuid4().hex}.part"

    def destination_for(self, header: Dataset) -> Path:
        relative = self.layout.render(header)
        final = (self.root / relative).resolve()
        # Defence in depth: sanitising should already make this impossible.
        if not final.is_relative_to(self.root.resolve()):
            raise LayoutError(f"rendered path {relative} escapes storage root {self.root}")
        return final

    def commit(self, staged: Path, header: Dataset, previous: Path | None = None) -> PlacedInstance:
        """Move a fully written, fsynced staged file to its layout path under the policy.

        `previous` is where this SOP Instance UID was stored before. The policy is
        about the instance, not the path: when a corrected Patient ID moves it to
        another folder, 'overwrite' removes the old file and 'keep' keeps it.
        """
        final = self.destination_for(header)
        elsewhere = self._stored_elsewhere(previous, final)
        if elsewhere is not None and self.duplicates != "overwrite":
            staged.unlink(missing_ok=True)
            return PlacedInstance(path=elsewhere, placement=Placement.KEPT_EXISTING)
        make_directories(final.parent)
        try:
            placement = self._place(staged, final)
        finally:
            staged.unlink(missing_ok=True)
        fsync_directory(final.parent)
        if elsewhere is not None:
            # Only once the new file is durable: a crash in between leaves two, never none.
            elsewhere.unlink(missing_ok=True)
            fsync_directory(elsewhere.parent)
            placement = Placement.OVERWRITTEN
        return PlacedInstance(path=final, placement=placement)

    def _stored_elsewhere(self, previous: Path | None, final: Path) -> Path | None:
        """The earlier file of this instance if it is at another path inside our root."""
        if previous is None or previous == final or not previous.is_file():
            return None
        # An index entry from an older config may point outside today's root: leave it.
        return previous if previous.resolve().is_relative_to(self.root.resolve()) else None

    def _place(self, staged: Path, final: Path) -> Placement:
        if self.duplicates == "overwrite":
            existed = final.exists()
            os.replace(staged, final)
            return Placement.OVERWRITTEN if existed else Placement.STORED
        # link() refuses to clobber, so two writers can never replace each other's file.
        try:
            os.link(staged, final)
        except FileExistsError:
            return Placement.KEPT_EXISTING
        return Placement.STORED


def duplicate_checker(
    queue: JobQueue, targets: dict[str, StorageTarget]
) -> Callable[[str, Sequence[JobSpec]], str | None]:
    """Find a 'reject' storage target that already has, or is getting, this SOP Instance UID."""

    def find_duplicate(sop_instance_uid: str, jobs: Sequence[JobSpec]) -> str | None:
        for job in jobs:
            target = targets.get(job.target) if job.kind == JobKind.STORE else None
            if (
                target
                and target.duplicates == "reject"
                and queue.is_known(target.name, sop_instance_uid)
            ):
                return target.name
        return None

    return find_duplicate
