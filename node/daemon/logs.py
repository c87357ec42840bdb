"""Logging setup: readable lines in a terminal, priority-prefixed lines under systemd."""

from __future__ import annotations

import logging
import os
import sys
import threading

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


class LoggedWarningFilter(logging.Filter):
    """Drop the warning that repeats what pydicom has just logged.

    pydicom's warn_and_log logs a message to the "pydicom" logger and then
    warns the same text. With warnings captured, every pydicom complaint would
    be logged twice; the logged line, which says which logger, is the one kept.
    Attached to both loggers; per thread, because associations read in threads.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            logged = getattr(self._last, "message", None)
            self._last.message = None
            return not (logged and logged in record.getMessage())
        self._last.message = record.getMessage()
        return True


_LOGGED_WARNING_FILTER = LoggedWarningFilter()


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
    # warnings.warn (pydicom warns about odd values it reads) would otherwise write bare
    # lines to stderr, which journald files at INFO without a logger name: route them
    # through the "py.warnings" logger and so through the handler above.
    logging.captureWarnings(True)
    for name in ("pydicom", "py.warnings"):
        logger = logging.getLogger(name)
        if _LOGGED_WARNING_FILTER not in logger.filters:
            logger.addFilter(_LOGGED_WARNING_FILTER)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level)
    # pynetdicom logs every PDU at INFO; keep it quiet unless we are debugging.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
