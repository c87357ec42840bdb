"""Storage Commitment records on SQLite: requests received and sent, and finished instances.

Two directions share one pair of tables. A *requested* commitment is one a
peer asked of us (N-ACTION-RQ received): it is recorded durably before the
N-ACTION-RSP, its items are settled one by one as their instances meet the
configured `when`, and it is deleted once its N-EVENT-REPORT is delivered. A
*sent* commitment is one we asked of a destination after C-STOREs: each item
names the forward job it vouches for, and the job waits (pending, due at the
deadline) until the report completes it or sends it again.

`finished_instances` remembers the SOP Instance UIDs whose every job is done
(their queue rows are deleted then), so that a request that arrives after
the instance went through can still be answered; it is written by
node.jobs.jobqueue when commitment is enabled and pruned after a retention.

The tables are node.jobs.commitment_schema's. The SQL is plain: `IN` lists, `CASE` sums, no SQLite-only functions.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from node.jobs.database import Database
from node.jobs.model import Job, JobKind, JobState
from node.jobs.rows import JOB_COLUMNS, job_from_row

COMMITTED = 0  # an item's reason once its instance is committed; a Failure Reason otherwise
_CHUNK = 500  # SQL parameters per IN list


class Direction(StrEnum):
    REQUESTED = "requested"  # a peer asked us (we are the Storage Commitment SCP)
    SENT = "sent"  # we asked a destination (we are the SCU)


@dataclass(frozen=True)
class CommitmentItem:
    sop_class_uid: str
    sop_instance_uid: str
    reason: int | None = None  # None: not settled yet; COMMITTED; or a Failure Reason
    job_id: int | None = None  # sent commitments: the forward job it vouches for


@dataclass(frozen=True)
class NewCommitment:
    direction: Direction
    transaction_uid: str
    peer: str  # the requesting calling AE title, or the destination's name
    our_ae_title: str  # the AE title the requestor called (we report as it)
    deadline: float
    items: tuple[CommitmentItem, ...]


@dataclass(frozen=True)
class Commitment:
    id: int
    direction: Direction
    transaction_uid: str
    peer: str
    our_ae_title: str
    created_at: float
    deadline: float
    attempts: int
    next_attempt_at: float
    items: tuple[CommitmentItem, ...]

    @property
    def settled(self) -> bool:
        return all(item.reason is not None for item in self.items)


@dataclass(frozen=True)
class InstanceProgress:
    """How far an instance got: from the queue while it has jobs, from history after."""

    sop_class_uid: str  # "" when only the storage index knows it
    store_open: bool = False  # a store job is not done yet
    forward_open: bool = False  # a forward job is not done yet (or waits for its commitment)
    failed: bool = False  # a job is a dead letter


@dataclass(frozen=True)
class CommitmentSummary:
    """One line of `queue status`: open commitments of one direction and peer."""

    direction: str
    peer: str
    count: int
    instances: int
    oldest_created_at: float | None
    next_attempt_at: float | None
    last_error: str | None


def _chunks(values: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" for _ in values)


class SqliteCommitments:
    """node.jobs.interface.CommitmentRecords on SQLite. Safe to share between threads."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def record_commitment(self, new: NewCommitment, waiting: Sequence[Job] = ()) -> int:
        """Record a commitment durably; returns its id.

        For a sent one, `waiting` are its forward jobs: in the same transaction they become
        pending, due at the deadline, and any older open item for them is dropped (a
        report for the older transaction no longer settles them).
        """

        def work(db: sqlite3.Connection) -> int:
            now = time.time()
            cursor = db.execute(
                "INSERT INTO commitments (direction, transaction_uid, peer, our_ae_title,"
                " created_at, deadline, next_attempt_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    new.direction,
                    new.transaction_uid,
                    new.peer,
                    new.our_ae_title,
                    now,
                    new.deadline,
                    now,
                    now,
                ),
            )
            commitment_id = int(cursor.lastrowid or 0)
            job_ids = [job.id for job in waiting]
            if job_ids:
                db.execute(
                    f"DELETE FROM commitment_items WHERE job_id IN ({_marks(job_ids)})", job_ids
                )
                db.executemany(
                    "UPDATE jobs SET state = ?, next_attempt_at = ?, last_error = ?,"
                    " updated_at = ? WHERE id = ?",
                    [
                        (
                            JobState.PENDING,
                            new.deadline,
                            f"awaiting the storage commitment report (transaction"
                            f" {new.transaction_uid})",
                            now,
                            job_id,
                        )
                        for job_id in job_ids
                    ],
                )
            db.executemany(
                "INSERT INTO commitment_items (commitment_id, position, sop_class_uid,"
                " sop_instance_uid, reason, job_id) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        commitment_id,
                        position,
                        item.sop_class_uid,
                        item.sop_instance_uid,
                        item.reason,
                        item.job_id,
                    )
                    for position, item in enumerate(new.items)
                ],
            )
            return commitment_id

        return int(self.database.write_durably(work))

    def open_commitments(self, direction: Direction) -> list[Commitment]:
        """Every open commitment of one direction with its items, oldest first."""
        with self.database.read() as db:
            heads = db.execute(
                "SELECT id, direction, transaction_uid, peer, our_ae_title, created_at, deadline,"
                " attempts, next_attempt_at FROM commitments WHERE direction = ? ORDER BY id",
                (direction,),
            ).fetchall()
            rows = db.execute(
                "SELECT commitment_items.commitment_id, sop_class_uid, sop_instance_uid, reason,"
                " job_id FROM commitment_items JOIN commitments"
                " ON commitments.id = commitment_items.commitment_id"
                " WHERE commitments.direction = ? ORDER BY commitment_items.commitment_id,"
                " commitment_items.position",
                (direction,),
            ).fetchall()
        items: dict[int, list[CommitmentItem]] = {}
        for commitment_id, *values in rows:
            items.setdefault(commitment_id, []).append(CommitmentItem(*values))
        return [
            Commitment(
                id=head[0],
                direction=Direction(head[1]),
                transaction_uid=head[2],
                peer=head[3],
                our_ae_title=head[4],
                created_at=head[5],
                deadline=head[6],
                attempts=head[7],
                next_attempt_at=head[8],
                items=tuple(items.get(head[0], ())),
            )
            for head in heads
        ]

    def settle_items(self, commitment_id: int, reasons: Mapping[int, int]) -> None:
        """Durably set item outcomes, by position: COMMITTED or a Failure Reason."""

        def work(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE commitment_items SET reason = ? WHERE commitment_id = ? AND position = ?",
                [(reason, commitment_id, position) for position, reason in reasons.items()],
            )

        self.database.write_durably(work)

    def close_commitment(self, commitment_id: int) -> None:
        """Durably delete a commitment whose report was delivered (or applied)."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM commitment_items WHERE commitment_id = ?", (commitment_id,))
            db.execute("DELETE FROM commitments WHERE id = ?", (commitment_id,))

        self.database.write_durably(work)

    def defer_commitment(self, commitment_id: int, error: str, until: float) -> None:
        """A report that could not be delivered: try again at `until`. Not fsynced: if lost,
        it is only tried sooner."""
        with self.database.transaction(durable=False) as db:
            db.execute(
                "UPDATE commitments SET attempts = attempts + 1, last_error = ?,"
                " next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (error, until, time.time(), commitment_id),
            )

    def instance_progress(self, sop_instance_uids: Sequence[str]) -> dict[str, InstanceProgress]:
        """What the queue, the finished history and the storage index know of these instances."""
        uids = list(dict.fromkeys(sop_instance_uids))
        found: dict[str, InstanceProgress] = {}
        with self.database.read() as db:
            for chunk in _chunks(uids):
                marks = _marks(chunk)
                for uid, sop_class in db.execute(
                    f"SELECT DISTINCT sop_instance_uid, '' FROM stored"
                    f" WHERE sop_instance_uid IN ({marks})",
                    list(chunk),
                ):
                    found[uid] = InstanceProgress(sop_class)
                for uid, sop_class in db.execute(
                    "SELECT sop_instance_uid, sop_class_uid FROM finished_instances"
                    f" WHERE sop_instance_uid IN ({marks})",
                    list(chunk),
                ):
                    found[uid] = InstanceProgress(sop_class)
                for uid, sop_class, store_open, forward_open, failed in db.execute(
                    "SELECT instances.sop_instance_uid, instances.sop_class_uid,"
                    " SUM(CASE WHEN jobs.kind = ? AND jobs.state != ? THEN 1 ELSE 0 END),"
                    " SUM(CASE WHEN jobs.kind = ? AND jobs.state != ? THEN 1 ELSE 0 END),"
                    " SUM(CASE WHEN jobs.state = ? THEN 1 ELSE 0 END)"
                    " FROM instances LEFT JOIN jobs ON jobs.instance_id = instances.id"
                    f" WHERE instances.sop_instance_uid IN ({marks})"
                    " GROUP BY instances.id, instances.sop_instance_uid, instances.sop_class_uid",
                    [
                        JobKind.STORE,
                        JobState.DONE,
                        JobKind.FORWARD,
                        JobState.DONE,
                        JobState.FAILED,
                        *chunk,
                    ],
                ):
                    # Received again while an older copy waits: the open copy decides.
                    earlier = found.get(uid)
                    progress = InstanceProgress(
                        sop_class, bool(store_open), bool(forward_open), bool(failed)
                    )
                    if earlier is not None and earlier.sop_class_uid == sop_class:
                        progress = InstanceProgress(
                            sop_class,
                            progress.store_open or earlier.store_open,
                            progress.forward_open or earlier.forward_open,
                            progress.failed or earlier.failed,
                        )
                    found[uid] = progress
        return found

    def jobs_by_id(self, job_ids: Sequence[int]) -> list[Job]:
        """The forward jobs a sent commitment vouches for that are still in the queue."""
        jobs: list[Job] = []
        ids = list(job_ids)
        with self.database.read() as db:
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                rows = db.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs JOIN instances"
                    f" ON instances.id = jobs.instance_id WHERE jobs.id IN ({_marks(chunk)})",
                    chunk,
                ).fetchall()
                jobs.extend(map(job_from_row, rows))
        return jobs

    def prune_finished(self, before: float) -> int:
        """Forget finished instances older than `before`; not fsynced (it is only history)."""
        with self.database.transaction(durable=False) as db:
            return db.execute(
                "DELETE FROM finished_instances WHERE finished_at < ?", (before,)
            ).rowcount

    def commitment_summary(self) -> list[CommitmentSummary]:
        """Open commitments per direction and peer, for `queue status` and the metrics."""
        with self.database.read() as db:
            rows = db.execute(
                "SELECT commitments.direction, commitments.peer, COUNT(DISTINCT commitments.id),"
                " COUNT(commitment_items.position), MIN(commitments.created_at),"
                " MIN(commitments.next_attempt_at), MAX(commitments.last_error)"
                " FROM commitments LEFT JOIN commitment_items"
                " ON commitment_items.commitment_id = commitments.id"
                " GROUP BY commitments.direction, commitments.peer"
                " ORDER BY commitments.direction, commitments.peer"
            ).fetchall()
        return [CommitmentSummary(*row) for row in rows]
