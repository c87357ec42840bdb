"""Storage Commitment records on the PostgreSQL queue (node.jobs.interface.CommitmentRecords).

node.jobs.commitments' SQL is portable and runs here as it is, through the sqlite3-shaped
adapter of node.jobs.postgres_groups; its durable writes hold the cluster's group-writes
lock, as SQLite's writers are serialised. The finished-instance history is written by the
completion function itself (node.jobs.postgres_schema) when [commitment] is enabled.

In a cluster the records are shared, with one rule: a request a peer made is reported by
the node that received it (`commitments.node`), whose reporter alone sees it among the
open requests; its instances' progress is the cluster's. So a report is never sent twice
by two nodes, and a dead node's requests are reported when it is back, like its spool.
A destination's report on a commitment we sent may reach any node, and is applied there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from node.jobs.commitments import Commitment, CommitmentItem, Direction, SqliteCommitments
from node.jobs.postgres_groups import PortableDatabase

if TYPE_CHECKING:
    from node.jobs.database import Database
    from node.jobs.postgres import PostgresDatabase


class PostgresCommitments(SqliteCommitments):
    """node.jobs.commitments' records on the PostgreSQL pool."""

    def __init__(self, database: PostgresDatabase) -> None:
        # node.jobs.commitments is typed for SQLite's Database; PortableDatabase has its API.
        super().__init__(cast("Database", PortableDatabase(database)))
        self.pg = database

    def open_commitments(self, direction: Direction) -> list[Commitment]:
        """As on SQLite; the requests peers made: only those this node received."""
        if direction != Direction.REQUESTED:
            return super().open_commitments(direction)
        heads = self.pg.execute(
            "SELECT id, direction, transaction_uid, peer, our_ae_title, created_at, deadline,"
            " attempts, next_attempt_at FROM commitments WHERE direction = %s AND node = %s"
            " ORDER BY id",
            (str(direction), self.pg.node),
        )
        rows = self.pg.execute(
            "SELECT i.commitment_id, i.sop_class_uid, i.sop_instance_uid, i.reason, i.job_id"
            " FROM commitment_items i JOIN commitments c ON c.id = i.commitment_id"
            " WHERE c.direction = %s AND c.node = %s ORDER BY i.commitment_id, i.position",
            (str(direction), self.pg.node),
        )
        items: dict[int, list[CommitmentItem]] = {}
        for commitment_id, *values in rows:
            items.setdefault(int(commitment_id), []).append(CommitmentItem(*values))
        return [
            Commitment(
                id=int(head[0]),
                direction=Direction(head[1]),
                transaction_uid=head[2],
                peer=head[3],
                our_ae_title=head[4],
                created_at=float(head[5]),
                deadline=float(head[6]),
                attempts=int(head[7]),
                next_attempt_at=float(head[8]),
                items=tuple(items.get(int(head[0]), ())),
            )
            for head in heads
        ]
