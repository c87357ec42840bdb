"""Logging setup: readable lines in a terminal, priority-prefixed lines under systemd."""

from __future__ import annotations

import logging
import os
import sys

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """journald adds its own timestamps; it reads '<N>' prefixes as syslog priorities.

    journald splits stdout/stderr into entries at newlines, so every line of a
    multi-line message (a traceback) gets the prefix, or it would land at INFO.
    """

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        lines = super().format(record).splitlines() or [""]
        first = f"<{priority}>{record.name}: {lines[0]}"
        return "\n".join([first, *(f"<{priority}>{record.name}:   {line}" for line in lines[1:])])


def under_journald() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level)
    # pynetdicom logs every PDU at INFO; keep it quiet unless we are debugging.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
