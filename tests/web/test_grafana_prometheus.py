"""docs/grafana-dashboard.json against a real Prometheus (Debian's) scraping a real node:
every query of every panel is valid PromQL and the main ones return the node's series."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.corpus import copies_with_new_uids, find
from tests.forward_support import StoreSCP, destination
from tests.processes import ServerProcess
from tests.support import REPO, configured_node, free_port, storescu, wait_until
from tests.tools import require_tool

# Panels that must show the node's traffic after it received and forwarded instances (the
# queue panels are empty then: delivered jobs leave the queue).
MUST_HAVE_DATA = {
    "Associations open",
    "Received, last hour",
    "Dead letters",
    "Instances received per second, by status",
    "Bytes per second",
    "Store jobs per second, by storage and outcome",
    "Forward jobs per second, by destination and outcome",
    "Acknowledgement to delivery",
}


class Prometheus(ServerProcess):
    label = "prometheus"

    def __init__(self, folder: Path, scrape: str) -> None:
        super().__init__(free_port(), folder / "prometheus.log", cwd=None)
        self.folder = folder
        (folder / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n  - job_name: dicom-node\n"
            f"    static_configs:\n      - targets: ['{scrape}']\n"
        )

    def command(self) -> list[str]:
        return [
            require_tool("prometheus"),
            f"--config.file={self.folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    def query(self, expr: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            answer: dict[str, Any] = json.loads(response.read())
        return answer


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    return [
        (panel["title"], t["expr"].replace("$instance", ".*").replace("$__rate_interval", "1m"))
        for panel in dashboard["panels"]
        for t in panel.get("targets", [])
    ]


def test_every_dashboard_query_runs_on_prometheus_and_shows_the_node(tmp_path: Path) -> None:
    storescp = StoreSCP(tmp_path / "pacs").start()
    metrics_port = free_port()

    def edit(config: dict[str, object]) -> None:
        config["destination"] = [destination("pacs", "STORESCP", storescp.port)]
        config["metrics"] = {"address": f"127.0.0.1:{metrics_port}"}

    node = configured_node(tmp_path / "node", edit).start()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{metrics_port}")
    try:
        prometheus.start()
        files = copies_with_new_uids(find("CT_small.dcm"), tmp_path / "in", 20)
        assert storescu(node.port, files).returncode == 0
        delivered = 'sum(dicom_node_instances_forwarded_total{status="success"})'
        assert wait_until(
            lambda: (
                [r["value"][1] for r in prometheus.query(delivered)["data"]["result"]] == ["20"]
            ),
            60,
            0.5,
        )
        # rate() needs two samples after the traffic: wait for the next scrapes.
        samples = "count_over_time(dicom_node_associations_active[1m])"
        assert wait_until(
            lambda: float(prometheus.query(samples)["data"]["result"][0]["value"][1]) >= 4, 30, 0.5
        )
        empty: set[str] = set()
        for title, expr in panel_queries():
            answer = prometheus.query(expr)
            assert answer["status"] == "success", (title, expr, answer)
            if not answer["data"]["result"]:
                empty.add(title)
        assert empty & MUST_HAVE_DATA == set(), empty
    finally:
        prometheus.stop()
        node.stop()
        storescp.kill()
