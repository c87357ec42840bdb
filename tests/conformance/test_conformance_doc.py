"""docs/conformance.md states what the code does: its generated tables must match the code.

The SOP class annex and the default transfer syntax order are written from the
same objects the Storage SCP negotiates with, so the statement cannot drift
from the node. To rewrite them after a change:

    DICOM_NODE_WRITE_DOCS=1 python -m pytest tests/conformance/test_conformance_doc.py
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydicom.uid import UID

from node.dicom.syntaxes import ALL_DECODABLE
from node.ingest.scp import STORAGE_SOP_CLASSES

REPO = Path(__file__).resolve().parents[2]
STATEMENT = REPO / "docs" / "conformance.md"
README = REPO / "README.md"


def storage_class_rows() -> str:
    def name(uid: str) -> str:
        return UID(uid).name if UID(uid).name != uid else "(private)"

    rows = sorted(STORAGE_SOP_CLASSES, key=lambda uid: (name(uid).lower(), uid))
    lines = ["| SOP class | UID |", "|---|---|"]
    lines += [f"| {name(uid)} | {uid} |" for uid in rows]
    return "\n".join(lines)


def syntax_rows() -> str:
    lines = ["| # | transfer syntax | UID |", "|---:|---|---|"]
    lines += [f"| {n} | {s.name} | {s} |" for n, s in enumerate(ALL_DECODABLE, start=1)]
    return "\n".join(lines)


def commitment_reason_rows() -> str:
    from node.commitment.messages import FAILURE_REASONS

    lines = ["| Failure Reason | meaning |", "|---|---|"]
    lines += [f"| 0x{code:04X} | {name} |" for code, name in sorted(FAILURE_REASONS.items())]
    return "\n".join(lines)


GENERATED = {
    "storage-sop-classes": storage_class_rows,
    "default-syntax-order": syntax_rows,
    "commitment-failure-reasons": commitment_reason_rows,
}


def _section(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- generated: {name} -->\n)(.*?)(\n<!-- end: {name} -->)", flags=re.DOTALL
    )


def test_generated_tables_match_the_code() -> None:
    text = STATEMENT.read_text()
    if os.environ.get("DICOM_NODE_WRITE_DOCS") == "1":
        for name, build in GENERATED.items():
            text = _section(name).sub(lambda m, b=build: m.group(1) + b() + m.group(3), text)
        STATEMENT.write_text(text)
    for name, build in GENERATED.items():
        found = _section(name).search(text)
        assert found is not None, f"docs/conformance.md lost its '{name}' markers"
        assert found.group(2) == build(), (
            f"docs/conformance.md's '{name}' table is out of date: "
            "rerun with DICOM_NODE_WRITE_DOCS=1"
        )


def test_statement_names_every_status_intake_returns() -> None:
    from node.ingest.intake import Status

    text = STATEMENT.read_text()
    missing = [f"0x{s.value:04X}" for s in Status if f"0x{s.value:04X}" not in text]
    assert missing == []


def test_readme_links_to_the_statement() -> None:
    assert "docs/conformance.md" in README.read_text()
