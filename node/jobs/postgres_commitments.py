"""Storage Commitment records on the PostgreSQL queue (node.jobs.interface.CommitmentRecords).

node.jobs.commitments' SQL is portable and runs here as it is, through the sqlite3-shaped
adapter of node.jobs.postgres_groups; its durable writes hold the cluster's group-writes
lock, as SQLite's writers are serialised. The finished-instance history is written by the
completion function itself (node.jobs.postgres_schema) when [commitment] is enabled.

In a cluster the records are shared: a commitment a peer asked of one node can be
settled and reported by any node's reporter (each instance's progress is the cluster's),
and a destination's report reaches whichever node it calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from node.jobs.commitments import SqliteCommitments
from node.jobs.postgres_groups import PortableDatabase

if TYPE_CHECKING:
    from node.jobs.database import Database
    from node.jobs.postgres import PostgresDatabase


class PostgresCommitments(SqliteCommitments):
    """node.jobs.commitments' records on the PostgreSQL pool."""

    def __init__(self, database: PostgresDatabase) -> None:
        # node.jobs.commitments is typed for SQLite's Database; PortableDatabase has its API.
        super().__init__(cast("Database", PortableDatabase(database)))
