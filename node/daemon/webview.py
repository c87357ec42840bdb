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


class NodeWebView:
    def __init__(self, running: Node) -> None:
        self.node = running
        self.started_at = time.time()
        self.panel_sources: list[Callable[[], Sequence[Panel]]] = []
        self.panel_actions: dict[str, Callable[[str], str]] = {}

    def config(self) -> Config:
        return self.node.config

    def queue(self) -> QueueOperations:
        return self.node.reports

    def live(self) -> Live:
        config = self.node.config
        folders = [Folder("spool", config.spool_dir, _free_space(config.spool_dir))]
        folders += [
            Folder(f"storage {name}", target.root, _free_space(target.root))
            for name, target in self.node.targets.items()
        ]
        holds = {
            worker.destination.name: Hold(worker.hold.until, worker.hold.streak)
            for worker in self.node.forwarder.workers
        }
        return Live(
            phase=self.node.phase,
            started_at=self.started_at,
            version=node.__version__,
            associations_open=len(self.node.scp.active_associations()),
            folders=folders,
            holds=holds,
        )

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
