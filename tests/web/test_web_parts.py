"""The status page's parts without a running node: the traffic ring, delivery delays,
destination states, dead-letter paging on a real queue database, the charts, the
status JSON of a stopped node, and the Grafana dashboard's metric names."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from wsgiref.util import setup_testing_defaults

from prometheus_client.metrics import MetricWrapperBase
from pydicom.uid import generate_uid

from node.commitment import counters as commitment_counters
from node.config.model import Config, load_config, parse_config
from node.daemon import metrics
from node.jobs.jobqueue import SqliteJobQueue
from node.jobs.model import JobKind, JobSpec, TargetSummary
from node.jobs.reports import SqliteQueueOperations
from node.web.activity import DeliveryDelays, RecentAssociations
from node.web.app import WebApp
from node.web.charts import bar_chart
from node.web.overview import destination_state, peer_of, redact_paths
from node.web.traffic import Flow, TrafficRing
from node.web.view import Hold, Live, Panel
from tests.daemon.test_daemon_status import queued_instance
from tests.support import REPO, base_config, dicom_node, free_port, write_config

T0 = 1_800_000_000.0  # a minute boundary


def test_the_traffic_ring_counts_per_minute_and_forgets_after_an_hour() -> None:
    ring = TrafficRing()
    ring.add(Flow.RECEIVED, 500, now=T0)
    ring.add(Flow.RECEIVED, 700, now=T0 + 59.9)
    ring.add(Flow.REFUSED, 100, now=T0 + 60)
    ring.add(Flow.FORWARDED, 1000, count=3, now=T0 + 61)
    minutes = ring.minutes(now=T0 + 61)
    assert len(minutes) == 60 and minutes[-1].start == T0 + 60
    assert minutes[-2].instances == {"received": 2, "stored": 0, "forwarded": 0, "refused": 0}
    assert minutes[-2].bytes["received"] == 1200
    assert minutes[-1].instances["refused"] == 1 and minutes[-1].instances["forwarded"] == 3
    assert ring.totals(now=T0 + 61)["instances"]["received"] == 2
    # 59 minutes later the first minute is still shown; one more and it is gone.
    assert ring.totals(now=T0 + 59 * 60)["instances"]["received"] == 2
    assert ring.totals(now=T0 + 60 * 60)["instances"]["received"] == 0
    ring.add(Flow.STORED, 1, now=T0 + 3 * 3600)
    assert len(ring._buckets) == 1, "old buckets are dropped, memory stays bounded"


def test_metrics_feed_the_ring_where_they_count() -> None:
    before = metrics.TRAFFIC.totals()
    metrics.record_received("success", 1000)
    metrics.record_received("out_of_resources", 10)
    metrics.record_stored("archive", "stored", 900)
    metrics.record_stored("archive", "retry")
    metrics.record_forwarded("pacs", "warning", 800)
    metrics.record_forwarded("pacs", "retry")
    after = metrics.TRAFFIC.totals()
    grew = {f: after["instances"][f] - before["instances"][f] for f in after["instances"]}
    assert grew == {"received": 1, "stored": 1, "forwarded": 1, "refused": 1}
    assert after["bytes"]["received"] - before["bytes"]["received"] == 1000
    assert after["bytes"]["forwarded"] - before["bytes"]["forwarded"] == 800


def test_delivery_delays_summarise_the_last_hour() -> None:
    delays = DeliveryDelays()
    for index, seconds in enumerate([1.0, 3.0, 2.0, 10.0]):
        delays.add("pacs", seconds, now=T0 + index)
    summary = delays.summary("pacs", now=T0 + 10)
    assert (summary.deliveries, summary.last, summary.median, summary.maximum) == (
        4,
        10.0,
        2.5,
        10.0,
    )
    assert delays.summary("pacs", now=T0 + 3700).deliveries == 0
    assert delays.summary("other").median is None


def test_destination_states() -> None:
    idle = TargetSummary("forward", "pacs")
    queued = TargetSummary("forward", "pacs", pending=4)
    assert destination_state(None, idle, None, T0) == ("idle", None)
    assert destination_state(Hold(T0 + 5, 2), queued, T0 + 5, T0) == ("held", T0 + 5)
    assert destination_state(Hold(T0 - 1, 0), queued, T0 - 1, T0) == ("sending", None)
    assert (
        destination_state(None, TargetSummary("forward", "pacs", running=1), None, T0)[0]
        == "sending"
    )
    assert destination_state(None, queued, T0 + 30, T0) == ("waiting", T0 + 30)
    # A hold outlasts the jobs: once the queue is empty the destination is idle.
    assert destination_state(Hold(T0 - 0.1, 3), idle, None, T0) == ("idle", None)


def test_dead_letters_are_paged_newest_first(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    queue = SqliteJobQueue.open(path)
    uids = [generate_uid() for _ in range(7)]
    for uid in uids:
        queue.record_instance(
            queued_instance(tmp_path, uid),
            [JobSpec(JobKind.FORWARD, "pacs"), JobSpec(JobKind.FORWARD, "other")],
        )
    for job in queue.claim(JobKind.FORWARD, target="pacs", limit=7):
        queue.dead_letter(job, f"refused {job.instance.sop_instance_uid}")
    (other,) = queue.claim(JobKind.FORWARD, target="other", limit=1)
    queue.dead_letter(other, "other refused")
    queue.close()
    reports = SqliteQueueOperations.open(path, read_only=True)
    try:
        assert reports.count_dead_letters(JobKind.FORWARD, "pacs") == 7
        assert reports.count_dead_letters(None, None) == 8
        first = reports.dead_letters(JobKind.FORWARD, "pacs", 0, 5)
        second = reports.dead_letters(JobKind.FORWARD, "pacs", 5, 5)
        assert len(first) == 5 and len(second) == 2
        seen = [d.sop_instance_uid for d in first + second]
        assert sorted(seen) == sorted(uids) and len(set(seen)) == 7
        assert [d.at for d in first + second] == sorted(
            (d.at for d in first + second), reverse=True
        )
        assert all(
            d.target == "pacs" and d.attempts == 1 and d.error.startswith("refused") for d in first
        )
    finally:
        reports.close()


def test_a_chart_has_one_bar_per_busy_minute_and_says_its_total() -> None:
    values = [0] * 58 + [3, 7]
    svg = bar_chart("received", "instances", values)
    assert svg.count("<rect") == 2
    assert 'data-total="10"' in svg and 'data-peak="7"' in svg
    assert "1 min ago: 3 instances" in svg and "this minute: 7 instances" in svg
    assert "<script" not in svg and "style=" not in svg
    assert bar_chart("refused", "MB", [0.0] * 60).count("<rect") == 0


def test_status_json_of_a_stopped_node_matches_its_text(tmp_path: Path) -> None:
    sections = base_config(tmp_path, free_port())
    sections["destination"] = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}]
    config = write_config(tmp_path / "config.toml", sections)
    queue = SqliteJobQueue.open(tmp_path / "data" / "queue.sqlite3")
    uid = generate_uid()
    queue.record_instance(queued_instance(tmp_path, uid), [JobSpec(JobKind.FORWARD, "pacs")])
    (job,) = queue.claim(JobKind.FORWARD, target="pacs")
    queue.dead_letter(job, "status 0xA900 from PACS")
    queue.close()
    result = dicom_node("status", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["node"] == {
        "ae_title": "DICOMNODE",
        "host": "127.0.0.1",
        "port": sections["node"]["port"],  # type: ignore[index]
        "running": False,
        "pid": None,
    }
    assert status["spool"]["instances"] == 1 and status["spool"]["bytes"] == 2_000_000
    targets = {(t["kind"], t["target"]): t for t in status["targets"]}
    assert targets["forward", "pacs"]["failed"] == 1
    assert targets["forward", "pacs"]["last_error"] == "status 0xA900 from PACS"
    assert targets["store", "archive"]["pending"] == 0
    assert [f["sop_instance_uid"] for f in status["recent_failures"]] == [uid]
    text = dicom_node("status", "-c", str(config)).stdout
    assert uid in text and "not running" in text


def _exposed_names() -> set[str]:
    """Every series name the node's metrics can expose (counters with _total, histograms
    with _bucket/_sum/_count, the queue collector's gauges)."""
    names = {
        "dicom_node_queue_jobs",
        "dicom_node_queue_oldest_pending_age_seconds",
        "dicom_node_groups_waiting",
        "dicom_node_group_late_arrivals_total",
    }
    for value in [*vars(metrics).values(), *vars(commitment_counters).values()]:
        if not isinstance(value, MetricWrapperBase):
            continue
        kind, name = value._type, value._name
        if kind == "counter":
            names.add(f"{name}_total")
        elif kind == "histogram":
            names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        elif kind == "gauge":
            names.add(name)
    return names


def test_the_grafana_dashboard_queries_only_metrics_the_node_has() -> None:
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exposed = _exposed_names()
    assert "dicom_node_forward_delivery_delay_seconds_bucket" in exposed
    queried: set[str] = set()
    ids = []
    for panel in dashboard["panels"]:
        ids.append(panel["id"])
        for target in panel.get("targets", []):
            queried.update(re.findall(r"dicom_node_[a-z_]+", target["expr"]))
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert queried - exposed == set()
    assert len(ids) == len(set(ids))
    # Every counter the node has is on the dashboard somewhere.
    counters = {n for n in exposed if n.endswith("_total")}
    assert counters - queried == set()


class PanelView:
    """A NodeView with one feature panel (as waiting study groups would add), over a real
    queue database and config: the seam node.daemon.webview implements for the node."""

    def __init__(self, folder: Path) -> None:
        sections = base_config(folder, free_port())
        self._config = load_config(write_config(folder / "config.toml", sections))
        SqliteJobQueue.open(self._config.queue_path).close()
        self._queue = SqliteQueueOperations.open(self._config.queue_path)
        self.released: list[str] = []

    def config(self) -> Config:
        return self._config

    def queue(self) -> SqliteQueueOperations:
        return self._queue

    def live(self) -> Live:
        return Live("ready", T0, "test", 0)

    def traffic(self) -> TrafficRing:
        return TrafficRing()

    def recent_associations(self) -> RecentAssociations:
        return RecentAssociations()

    def delivery_delays(self) -> DeliveryDelays:
        return DeliveryDelays()

    def panels(self) -> list[Panel]:
        return [
            Panel(
                "groups",
                "Waiting groups",
                ["study", "instances"],
                rows=[["1.2.3", "12"], ["1.2.4", "3"]],
                action="Release",
                row_keys=["g1", "g2"],
            )
        ]

    def retry_dead_letters(self, destination: str) -> int:
        return 0

    def panel_action(self, panel: str, row: str) -> str:
        if panel != "groups" or row not in ("g1", "g2"):
            raise KeyError(row)
        self.released.append(row)
        return f"released {row}"


def wsgi(
    app: WebApp, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[str, dict[str, str], str]:
    environ: dict[str, object] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    if body:
        environ["CONTENT_TYPE"] = "application/x-www-form-urlencoded"
    environ.update({"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()})
    setup_testing_defaults(environ)
    answer: dict[str, object] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answer["status"], answer["headers"] = status, dict(headers)

    text = b"".join(app(environ, start_response)).decode()
    return str(answer["status"]), answer["headers"], text  # type: ignore[return-value]


def test_a_feature_panel_is_shown_and_its_row_action_needs_token_and_csrf(tmp_path: Path) -> None:
    view = PanelView(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("panel-token")
    app = WebApp(view, token_file)
    auth = {"Authorization": "Bearer panel-token"}
    status, _, page = wsgi(app, "GET", "/", auth)
    assert status.startswith("200")
    assert 'id="panel-groups"' in page and "Waiting groups" in page and "1.2.4" in page
    assert page.count(">Release</button>") == 2
    overview = json.loads(wsgi(app, "GET", "/api/overview", auth)[2])
    assert overview["panels"]["groups"]["row_keys"] == ["g1", "g2"]

    status, _, body = wsgi(app, "POST", "/api/panels/groups/g2", auth)
    assert status.startswith("200") and json.loads(body)["result"] == "released g2"
    assert wsgi(app, "POST", "/api/panels/groups/nope", auth)[0].startswith("404")
    assert wsgi(app, "POST", "/api/panels/groups/g1", {})[0].startswith("401")

    status, headers, _ = wsgi(app, "POST", "/login", {}, b"token=panel-token")
    cookie = headers["Set-Cookie"].split(";")[0]
    page = wsgi(app, "GET", "/", {"Cookie": cookie})[2]
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)  # type: ignore[union-attr]
    form = f"panel=groups&row=g1&csrf={csrf}".encode()
    assert wsgi(app, "POST", "/actions/panel", {"Cookie": cookie}, b"panel=groups&row=g1")[
        0
    ].startswith("403")
    assert view.released == ["g2"]
    assert wsgi(app, "POST", "/actions/panel", {"Cookie": cookie}, form)[0].startswith("303")
    assert view.released == ["g2", "g1"]
    # Without a token file the panel is shown, read-only.
    assert ">Release</button>" not in wsgi(WebApp(view, None), "GET", "/", {})[2]


def test_stored_paths_in_errors_lose_what_the_layout_put_below_the_root() -> None:
    roots = [Path("/srv/archive"), Path("/srv/second")]
    error = (
        "[Errno 13] Permission denied: '/srv/archive/PAT123/1.2.3/1.2.3.4.dcm'; also"
        " /srv/second/DOE^JOHN/x.dcm: read-only; /srv/archived/other stays"
    )
    assert redact_paths(error, roots) == (
        "[Errno 13] Permission denied: '/srv/archive/…'; also /srv/second/…: read-only;"
        " /srv/archived/other stays"
    )
    assert redact_paths(None, roots) is None


def test_a_dicomweb_destination_is_shown_by_its_url_without_credentials() -> None:
    config = parse_config(
        {
            "destination": [
                {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.9", "port": 104},
                {
                    "name": "web",
                    "protocol": "dicomweb",
                    "url": "https://u:p@pacs.example/dicom-web",
                },
            ]
        },
        Path("/etc/dicom-node/config.toml"),
    )
    assert [peer_of(d) for d in config.destinations] == [
        "PACS@10.0.0.9:104",
        "https://pacs.example/dicom-web",
    ]
