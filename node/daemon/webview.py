"""The running node as the status page sees it (node.web.view.NodeView).

Features that add a section to the page (waiting study groups, storage commitments)
register a panel source on the view: `node.web_view.panel_sources.append(callable)`,
where the callable returns node.web.view.Panel objects; a panel whose rows have an
action (releasing a waiting group) registers its handler too:
`node.web_view.panel_actions["groups"] = release`, called with the row's key and
returning what it did (a KeyError for a row it does not know).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import node
from node.config.model import Config
from node.daemon import metrics
from node.jobs.interface import QueueOperations
from node.jobs.model import JobKind
from node.web.activity import DeliveryDelays, RecentAssociations
from node.web.traffic import TrafficRing
from node.web.view import Folder, Hold, Live, Panel

if TYPE_CHECKING:
    from node.daemon.server import Node


def _free_space(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _next_try(direction: str, at: float | None, now: float) -> str:
    if direction != "requested" or at is None:
        return "-"
    return "when settled" if at <= now else f"in {at - now:.0f} s"


class NodeWebView:
    def __init__(self, running: Node) -> None:
        self.node = running
        self.started_at = time.time()
        self.panel_sources: list[Callable[[], Sequence[Panel]]] = [self._commitments]
        self.panel_actions: dict[str, Callable[[str], str]] = {}

    def config(self) -> Config:
        return self.node.config

    def queue(self) -> QueueOperations:
        return self.node.reports

    def live(self) -> Live:
        config = self.node.config
        folders = [Folder("spool", config.spool_dir, _free_space(config.spool_dir))]
        # Copies first: a reload swaps the targets and the forwarder from the main thread.
        targets = dict(self.node.targets)
        workers = list(self.node.forwarder.workers)
        folders += [
            Folder(f"storage {name}", target.root, _free_space(target.root))
            for name, target in targets.items()
        ]
        holds = {
            worker.destination.name: Hold(worker.hold.until, worker.hold.streak)
            for worker in workers
        }
        return Live(
            phase=self.node.phase,
            started_at=self.started_at,
            version=node.__version__,
            associations_open=len(self.node.scp.active_associations()),
            folders=folders,
            holds=holds,
        )

    def _commitments(self) -> list[Panel]:
        """Open Storage Commitments, as `queue status` shows them: when the node serves them
        or a destination asks for them, or while any is open."""
        config = self.node.config
        rows = self.node.commitments.commitment_summary()
        in_use = config.commitment.enabled or any(d.commitment for d in config.destinations)
        if not rows and not in_use:
            return []
        now = time.time()
        return [
            Panel(
                "commitments",
                "Storage commitments",
                ("direction", "peer", "open", "instances", "oldest", "next try", "last error"),
                rows=[
                    (
                        row.direction,
                        row.peer,
                        str(row.count),
                        str(row.instances),
                        "-"
                        if row.oldest_created_at is None
                        else f"{now - row.oldest_created_at:.0f} s ago",
                        _next_try(row.direction, row.next_attempt_at, now),
                        row.last_error or "-",
                    )
                    for row in rows
                ],
                empty="no storage commitment is open",
                note="requested: asked of this node by a modality (peer: its calling AE title),"
                " open until its report is delivered; sent: asked by this node of a destination,"
                " open until that destination's report arrives.",
            )
        ]

    def traffic(self) -> TrafficRing:
        return metrics.TRAFFIC

    def recent_associations(self) -> RecentAssociations:
        return metrics.RECENT_ASSOCIATIONS

    def delivery_delays(self) -> DeliveryDelays:
        return metrics.DELIVERY_DELAYS

    def panels(self) -> list[Panel]:
        return [panel for source in self.panel_sources for panel in source()]

    def panel_action(self, panel: str, row: str) -> str:
        if panel == "groups":
            return self._release_group(row)
        return self.panel_actions[panel](row)

    def _release_group(self, row: str) -> str:
        """Release one series or study group (the key node.web.overview.release_key made)."""
        level, _, rest = row.partition(":")
        uid, _, target = rest.partition(":")
        if level not in ("series", "study") or not uid or not target:
            raise KeyError(row)
        count = self.node.reports.release_groups(
            study=uid if level == "study" else None,
            series=uid if level == "series" else None,
            target=target,
        )
        if not count:
            raise KeyError(row)  # dispatched meanwhile, or never there
        self.node.forwarder.wake()
        self.node.store_workers.wake.set()
        return f"{count} {level} groups of {uid} for {target!r} released"

    def retry_dead_letters(self, destination: str) -> int:
        count = self.node.reports.retry(JobKind.FORWARD, destination, failed=True)
        self.node.forwarder.wake()
        return count
