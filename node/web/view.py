"""What the status page reads of the running node: the NodeView protocol the daemon
implements (node.daemon.webview), and the records it answers with.

The web package never imports the daemon: everything live (the forwarder's holds,
open associations, the in-memory traffic ring) comes through this seam, so the
pages and the API can be tested against any object that has these methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from node.config.model import Config
from node.jobs.interface import QueueOperations
from node.web.activity import DeliveryDelays, RecentAssociations
from node.web.traffic import TrafficRing


@dataclass(frozen=True)
class Hold:
    """A destination's backoff while its peer is unreachable (node.forward's DestinationHold)."""

    until: float  # epoch seconds; in the past when the destination is not held
    streak: int  # failed attempts in a row


@dataclass(frozen=True)
class Folder:
    """A folder the node writes to, and the free space on its filesystem."""

    role: str  # "spool" or "storage NAME"
    path: Path
    free: int | None  # bytes; None when it cannot be read


@dataclass(frozen=True)
class Panel:
    """A table another feature adds to the page (waiting groups, storage commitments):
    a title, column names, rows of text, and a sentence for when there are no rows.
    Its `key` names it in /api/overview."""

    key: str
    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]] = ()
    empty: str = "none"
    note: str = ""
    # An action on one row (e.g. "Release" for a waiting group), for token holders: its
    # button label, and what identifies each row to NodeView.panel_action (same order).
    action: str = ""
    row_keys: Sequence[str] = ()


@dataclass(frozen=True)
class Live:
    """The node's state right now, as only the running process knows it."""

    phase: str  # "starting", "ready", "reloading", "draining"
    started_at: float  # epoch seconds
    version: str
    associations_open: int
    folders: Sequence[Folder] = ()
    holds: dict[str, Hold] = field(default_factory=dict)


class NodeView(Protocol):
    def config(self) -> Config: ...
    def queue(self) -> QueueOperations: ...
    def live(self) -> Live: ...
    def traffic(self) -> TrafficRing: ...
    def recent_associations(self) -> RecentAssociations: ...
    def delivery_delays(self) -> DeliveryDelays: ...
    def panels(self) -> Sequence[Panel]: ...
    def retry_dead_letters(self, destination: str) -> int: ...
    # A panel's action on one of its rows; returns what was done, raises KeyError if the
    # panel or the row is not known.
    def panel_action(self, panel: str, row: str) -> str: ...
