"""Every relative link and #anchor in README.md and docs/*.md resolves.

The docs are plain Markdown read offline (on GitHub, in an editor, in
/usr/share/doc): a link to a moved file or a renamed heading must fail here,
not in front of an administrator. Anchors are computed as GitHub computes
them from the headings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
CODE_SPAN = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target); the text may hold code spans, already blanked.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", flags=re.IGNORECASE)


@dataclass(frozen=True)
class Link:
    source: Path
    line: int
    target: str


def prose_lines(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, numbered from 1."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lowercased, punctuation
    removed, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        heading = HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[Link]:
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(CODE_SPAN.sub("``", line)):
            found.append(Link(path, number, match.group(1)))
    return found


def broken(link: Link) -> str | None:
    """Why a link does not resolve, or None when it does."""
    if EXTERNAL.match(link.target):
        return None
    file_part, _, anchor = link.target.partition("#")
    target = (link.source.parent / file_part).resolve() if file_part else link.source
    if not target.exists():
        return f"{file_part} does not exist"
    if REPO not in target.parents and target != REPO:
        return f"{file_part} is outside the repository"
    if anchor and target.suffix == ".md" and anchor not in anchors(target):
        return f"{target.relative_to(REPO)} has no heading with anchor #{anchor}"
    return None


def problems(paths: list[Path]) -> list[str]:
    return [
        f"{link.source.relative_to(REPO)}:{link.line}: ({link.target}): {reason}"
        for path in paths
        for link in links(path)
        if (reason := broken(link)) is not None
    ]


def test_every_relative_link_and_anchor_resolves() -> None:
    assert problems(DOCS) == []


def test_the_docs_link_to_each_other() -> None:
    # Guards the test itself: if link parsing broke, the check above would pass on nothing.
    targets = {link.target for path in DOCS for link in links(path)}
    assert "docs/configuration.md" in targets
    assert "docs/conformance.md" in targets
    assert len(targets) > 20


def test_slugs_follow_github() -> None:
    assert slug("[destination.retry]") == "destinationretry"
    assert slug("[[storage]]") == "storage"
    assert slug('What "delivered" means') == "what-delivered-means"
    assert slug("`dicom-node status`") == "dicom-node-status"
    assert slug("Annex A: Storage SOP classes") == "annex-a-storage-sop-classes"


def test_a_broken_link_and_a_missing_anchor_are_reported(tmp_path: Path) -> None:
    page = REPO / "docs" / "configuration.md"
    sample = Link(page, 1, "operations.md#no-such-heading")
    assert broken(sample) == "docs/operations.md has no heading with anchor #no-such-heading"
    assert broken(Link(page, 1, "missing.md")) == "missing.md does not exist"
    assert broken(Link(page, 1, "#node")) is None
    assert broken(Link(page, 1, "https://dicom.nema.org/")) is None
