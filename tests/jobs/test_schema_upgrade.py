"""Upgrading in place: a database from an older release gains the columns added since."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from node.jobs.database import add_missing_columns


def test_missing_columns_are_added_once_and_keep_existing_rows(tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "old.db")
    connection.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, kind TEXT)")
    connection.execute("INSERT INTO jobs (kind) VALUES ('store')")

    first = add_missing_columns(connection, [("jobs", "note", "TEXT NOT NULL DEFAULT ''")])
    again = add_missing_columns(connection, [("jobs", "note", "TEXT NOT NULL DEFAULT ''")])

    assert first == ["jobs.note"]
    assert again == []
    assert connection.execute("SELECT id, kind, note FROM jobs").fetchall() == [(1, "store", "")]
