"""Storage targets: where an instance lands on disk, and how it gets there atomically.

The path comes from a template of DICOM keywords. Every value is sanitised so
that nothing a sender puts in a tag can lead a file outside the storage root.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydicom.dataset import Dataset

from node.config.model import DuplicatePolicy, StorageConfig
from node.dicom.header import PARSE_ERRORS, DatasetError
from node.jobs.interface import JobQueue
from node.jobs.model import JobKind, JobSpec
from node.shape import Shaping
from node.shape.build import build_shaping
from node.store.durable import (
    LINK_REFUSED,
    FolderSyncs,
    fsync_directory,
    link_or_copy,
    make_directories,
)
from node.store.layout import LayoutError, header_texts, parse_layout

STAGING_DIR = ".incoming"
# What reading a recorded header value can raise: str() of a PersonName decodes it only then.
_UNREADABLE: tuple[type[BaseException], ...] = (DatasetError, *PARSE_ERRORS)


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
    # The folder whose fsync is still owed before this counts as stored (place(sync=False)).
    unsynced_folder: Path | None = None
    size: int | None = None  # bytes stored, when `path` is not a local file (an S3 object)


class StorageTarget:
    """One [[storage]] folder: stages files next to their destination, then renames."""

    # Placing is a link or rename on a local disk (an S3 target's is a network PUT).
    places_locally = True

    def __init__(self, config: StorageConfig, root: Path | None = None) -> None:
        """root: the local folder it writes (another kind's staging); default: config.path."""
        self.config = config
        self.name = config.name
        if root is None:
            assert config.path is not None, "config checks: a filesystem target has a path"
            root = config.path
        self.root: Path = root
        self.layout = parse_layout(config.layout)
        self.staging = self.root / STAGING_DIR
        self._folders = FolderSyncs()
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
        return self._inside_root(self.layout.render(header))

    def destination_from(self, texts: Mapping[str, str]) -> Path | None:
        """The path from header values recorded at intake; None if one the layout needs is
        missing (recorded under an older layout: read the file instead)."""
        if not all(keyword in texts for keyword in self.layout.keywords):
            return None
        return self._inside_root(self.layout.render_values(texts))

    def _inside_root(self, relative: Path) -> Path:
        final = (self.root / relative).resolve()
        # Defence in depth: sanitising should already make this impossible.
        if not final.is_relative_to(self.root.resolve()):
            raise LayoutError(f"rendered path {relative} escapes storage root {self.root}")
        return final

    def commit(self, staged: Path, header: Dataset, previous: Path | None = None) -> PlacedInstance:
        """Move a fully written, fsynced staged file to its layout path under the policy."""
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
        """Put a fully written, fsynced file at `final` under the duplicates policy.

        keep_source: `staged` is the spool file itself (stored as received): it is hard-linked
        into place, or copied where the storage root is on another filesystem, never moved.
        Otherwise `staged` is a file of ours in the staging folder, gone afterwards.
        sync=False leaves the folder's fsync to the caller (unsynced_folder), which batches
        it; replacing an instance stored at another path always syncs here, first.

        `previous` is where this SOP Instance UID was stored before. The policy is
        about the instance, not the path: when a corrected Patient ID moves it to
        another folder, 'overwrite' removes the old file and 'keep' keeps it.
        """
        elsewhere = self._stored_elsewhere(previous, final)
        try:
            if elsewhere is not None and self.duplicates != "overwrite":
                return PlacedInstance(path=elsewhere, placement=Placement.KEPT_EXISTING)
            make_directories(final.parent)
            placement = self._link(staged, final) if keep_source else self._place(staged, final)
        finally:
            if not keep_source:
                staged.unlink(missing_ok=True)
        if elsewhere is None and not sync:
            return PlacedInstance(path=final, placement=placement, unsynced_folder=final.parent)
        # Nothing counts as stored before its directory entry is on disk. Workers placing
        # into the same folder at the same time share one fsync.
        self._folders.sync(final.parent)
        if elsewhere is not None:
            # Only once the new file is durable: a crash in between leaves two, never none.
            elsewhere.unlink(missing_ok=True)
            fsync_directory(elsewhere.parent)
            placement = Placement.OVERWRITTEN
        return PlacedInstance(path=final, placement=placement)

    def _link(self, source: Path, final: Path) -> Placement:
        """Place the spool file as it is: one link() in the common case, no bytes copied."""
        try:
            os.link(source, final)  # refuses to clobber, like _place's
            return Placement.STORED
        except FileExistsError:
            if self.duplicates != "overwrite":
                return Placement.KEPT_EXISTING
        except OSError as exc:
            if exc.errno not in LINK_REFUSED:
                raise
        # Another filesystem, or a stored file to replace: first a complete, fsynced file of
        # our own beside the final path, then the atomic link or rename of _place. A copy
        # written at the final path itself could be seen (or left by a crash) half-written.
        staged = self.staging_path()
        try:
            link_or_copy(source, staged)
            return self._place(staged, final)
        finally:
            staged.unlink(missing_ok=True)

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


def header_recorder(
    targets: Mapping[str, StorageTarget],
) -> Callable[[Dataset], tuple[tuple[str, str], ...]]:
    """What intake records with each instance: the values every target's layout needs.

    `targets` is read at each call, so a reload that changes it in place is seen. A
    value that cannot be read is left out; the store worker then reads the file and
    fails (and retries) exactly as it would have without this record.
    """

    def record(header: Dataset) -> tuple[tuple[str, str], ...]:
        keywords = tuple(dict.fromkeys(k for t in targets.values() for k in t.layout.keywords))
        try:
            return tuple(header_texts(header, keywords).items())
        except _UNREADABLE:
            return ()

    return record


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
