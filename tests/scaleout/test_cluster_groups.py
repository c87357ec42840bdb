"""A study sent over two associations that land on two nodes is one group of the shared
queue: it waits for both parts, becomes stable once, is dispatched once, and each node
sends the members its spool holds."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
from pydicom.data import get_testdata_file

from tests.corpus import copies_with_new_uids, sop_instance_uid
from tests.postgres import PostgresServer
from tests.scaleout.test_cluster import ForkingStoreSCP
from tests.support import NodeProcess, free_port, storescu, wait_until, write_config

STABLE_AFTER = 3.0


def grouping_node(folder: Path, name: str, dsn_file: Path, pacs: int) -> NodeProcess:
    port = free_port()
    sections: dict[str, object] = {
        "node": {
            "ae_title": "DICOMNODE",
            "host": "127.0.0.1",
            "port": port,
            "data_dir": str(folder / name),
            "name": name,
        },
        "limits": {"min_free_space": 0},
        "queue": {"backend": "postgresql", "dsn_file": str(dsn_file), "lease": 3},
        "storage": [{"name": "archive", "path": str(folder / name / "archive")}],
        "destination": [
            {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs}
        ],
        "route": [
            {"name": "archive", "storage": ["archive"]},
            {
                "name": "studies",
                "destinations": ["pacs"],
                "trigger": "study",
                "stable_after": STABLE_AFTER,
            },
        ],
    }
    config = write_config(folder / f"{name}.toml", sections)
    return NodeProcess(config, port, env={"JOURNAL_STREAM": None})


def rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        return [tuple(row) for row in connection.execute(query)]


def test_a_study_over_two_nodes_forms_one_stable_group(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    dsn = postgres_server.new_schema()
    dsn_file = tmp_path / "pg.dsn"
    dsn_file.write_text(dsn)
    dsn_file.chmod(0o600)
    files = copies_with_new_uids(Path(get_testdata_file("CT_small.dcm")), tmp_path / "in", 10)
    pacs = ForkingStoreSCP(tmp_path / "pacs", "STORESCP", "--fork").start()
    nodes = [grouping_node(tmp_path, name, dsn_file, pacs.port) for name in ("a", "b")]
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_ready(60)
        # The study's first half on node a, its second half on node b, one after the other.
        assert storescu(nodes[0].port, files[:5]).returncode == 0
        first_part_at = time.monotonic()
        assert storescu(nodes[1].port, files[5:]).returncode == 0
        waiting = rows(dsn, "SELECT state, members FROM job_groups")
        assert waiting == [("waiting", 10)], waiting
        assert rows(
            dsn,
            "SELECT node, COUNT(*) FROM jobs WHERE state = 'waiting' GROUP BY node ORDER BY node",
        ) == [
            ("a", 5),
            ("b", 5),
        ]
        assert wait_until(lambda: len(pacs.files()) == 10, timeout=60)
        # Stable means quiet for STABLE_AFTER after the *last* member, wherever it arrived.
        assert time.monotonic() - first_part_at >= STABLE_AFTER
        assert wait_until(
            lambda: rows(dsn, "SELECT state FROM job_groups") == [("delivered",)], timeout=30
        )
        totals = dict(rows(dsn, "SELECT name, value FROM job_group_totals"))
        assert totals == {"dispatched": 1, "late_arrivals": 0}, totals
        forwarded = sorted(p.name.split(".", 1)[1] for p in pacs.files())
        assert forwarded == sorted(sop_instance_uid(f) for f in files)
    finally:
        for node in nodes:
            node.kill()
        pacs.kill()
