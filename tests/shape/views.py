"""DCMTK's element view (tests/dcmtk_view.py) of a source and of its shaped copy: which
elements changed, each with the tags of the sequences it is in."""

from __future__ import annotations

import re

from tests.dcmtk_view import View, differences


def changed_elements(before: View, after: View) -> list[tuple[list[int], str]]:
    """(tags from the top-level element down to the changed one, the diff line)."""
    changed = []
    for line in differences(_with_ancestors(before), _with_ancestors(after), lossy_source=False):
        chain = [int(tag, 16) for tag in line[1:].split("|")[0].split("/")]
        changed.append((chain, line[0] + line.split("|", 1)[1]))
    return changed


def _with_ancestors(view: View) -> View:
    """Each line prefixed with its tag and its enclosing sequences' tags, so that a line
    inside a removed sequence counts as that sequence's change. Lengths and item counts
    follow what is inside, so they are left out."""
    lines: list[str] = []
    stack: list[tuple[int, str]] = []
    for line in view.lines:
        depth = len(line) - len(line.lstrip())
        tag = _tag_of(line)
        # A Sequence Delimitation Item is dumped at its sequence's own depth.
        closing = tag == 0xFFFEE0DD
        while stack and (stack[-1][0] > depth or (stack[-1][0] == depth and not closing)):
            stack.pop()
        if not closing:
            stack.append((depth, f"{tag:08x}"))
        text = re.sub(r"#\s*(\d+|u/l),|#=\d+", "#", line.strip())
        lines.append("/".join(t for _d, t in stack) + "|" + text)
    return View(tuple(lines), view.native, view.decoder, view.problems)


def _tag_of(line: str) -> int:
    match = re.search(r"\(([0-9a-f]{4}),([0-9a-f]{4})\)", line)
    assert match, line
    return int(match.group(1) + match.group(2), 16)
