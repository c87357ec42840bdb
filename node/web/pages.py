"""The status page as server-rendered HTML: tables that read without JavaScript, charts
drawn as SVG (node.web.charts), one stylesheet from the node itself, no inline script or
style (the Content-Security-Policy forbids both). Every value is escaped.

The pages render the dicts of node.web.overview, the same the JSON API serves.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import urlencode

from node.web.charts import bar_chart
from node.web.traffic import Flow

REFRESH_SECONDS = 5


@dataclass(frozen=True)
class Viewer:
    """Who looks at the page: whether they may act (token configured and presented), the
    CSRF token their forms must carry, and whether they came with a session cookie."""

    can_act: bool = False
    csrf: str = ""
    signed_in: bool = False
    token_required: bool = False


def clock(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def megabytes(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:,.1f} MB"


def _cells(values: Iterable[str], tag: str = "td") -> str:
    return "".join(f"<{tag}>{value}</{tag}>" for value in values)


def table(
    columns: Sequence[str], rows: Iterable[str], empty: str, caption: str = "", cls: str = ""
) -> str:
    """A table with pre-rendered <tr> rows; `empty` is shown in their place when none."""
    body = (
        "".join(rows) or f'<tr><td class="empty" colspan="{len(columns)}">{escape(empty)}</td></tr>'
    )
    head = _cells((escape(c) for c in columns), "th")
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f'<table class="{cls}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def layout(
    title: str,
    main: str,
    viewer: Viewer,
    refresh: int | None,
    generated_at: float,
    links: bool = True,
) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    session = ""
    if viewer.signed_in:
        session = (
            '<form class="inline" method="post" action="/logout">'
            f'<input type="hidden" name="csrf" value="{escape(viewer.csrf)}">'
            '<button type="submit">Sign out</button></form>'
        )
    refresh_note = (
        f'refreshes every {refresh} s (<a href="?refresh=0">stop</a>)'
        if refresh
        else '<a href="/">auto-refresh</a>'
    )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{meta}<title>{escape(title)}</title>"
        '<link rel="stylesheet" href="/static/style.css"></head>'
        f'<body data-generated-at="{generated_at:.3f}">'
        f'<header><h1><a href="/">{escape(title)}</a></h1>'
        f'<p class="meta">generated {escape(clock(generated_at))}'
        + (f'; {refresh_note} · <a href="/api/">JSON API</a>' if links else "")
        + "</p>"
        f"{session}</header><main>{main}</main></body></html>\n"
    )


def _badge(state: str, text: str | None = None) -> str:
    return f'<span class="badge state-{escape(state)}">{escape(text or state)}</span>'


def now_section(now: Mapping[str, Any]) -> str:
    facts = [
        ("state", _badge(now["phase"])),
        ("uptime", escape(duration(now["uptime_seconds"]))),
        ("version", escape(now["version"])),
        ("associations open", str(now["associations_open"])),
        ("DICOM", f"{escape(now['ae_title'])} on port {now['dicom_port']}"),
    ]
    facts_html = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    folders = [
        f'<tr class="{"low" if f["low"] else ""}"><td>{escape(f["role"])}</td>'
        f"<td><code>{escape(f['path'])}</code></td><td>{escape(megabytes(f['free']))}</td>"
        f"<td>{'below the minimum' if f['low'] else 'ok'}</td></tr>"
        for f in now["folders"]
    ]
    space = table(
        ["folder", "path", "free", f"against min_free_space ({megabytes(now['min_free_space'])})"],
        folders,
        "no folders",
    )
    return (
        '<section id="now"><h2>Now</h2><div class="pair">'
        f'<table class="facts"><tbody>{facts_html}</tbody></table>{space}</div></section>'
    )


def traffic_section(traffic: Mapping[str, Any]) -> str:
    minutes = traffic["minutes"]
    rows = []
    for flow in Flow:
        counts = [m["instances"][flow.value] for m in minutes]
        sizes = [m["bytes"][flow.value] / 1e6 for m in minutes]
        total = traffic["totals"]
        rows.append(
            f'<tr id="traffic-{flow.value}"><th>{flow.value}</th>'
            f"<td>{bar_chart(flow.value, 'instances', counts)}</td>"
            f"<td>{bar_chart(flow.value, 'MB', sizes)}</td>"
            f'<td class="num">{total["instances"][flow.value]:,}</td>'
            f'<td class="num">{escape(megabytes(total["bytes"][flow.value]))}</td></tr>'
        )
    return (
        '<section id="traffic"><h2>Traffic, last hour</h2>'
        + table(
            ["", "instances per minute", "MB per minute", "instances", "bytes"],
            rows,
            "",
            cls="traffic",
        )
        + '<p class="note">Counted since the node started; refused means a C-STORE answered'
        " with a failure status. Oldest minute on the left.</p></section>"
    )


def _retry_form(name: str, count: int, viewer: Viewer) -> str:
    if not viewer.can_act or count == 0:
        return ""
    return (
        '<form class="inline" method="post" action="/actions/retry">'
        f'<input type="hidden" name="csrf" value="{escape(viewer.csrf)}">'
        f'<input type="hidden" name="destination" value="{escape(name)}">'
        f'<button type="submit">Retry {count} dead letters</button></form>'
    )


def _delay(delay: Mapping[str, Any]) -> str:
    if not delay["deliveries"]:
        return "-"
    return (
        f"median {escape(duration(delay['median']))}, last {escape(duration(delay['last']))},"
        f" max {escape(duration(delay['maximum']))} ({delay['deliveries']} in the last hour)"
    )


def destinations_section(rows: Sequence[Mapping[str, Any]], viewer: Viewer, now: float) -> str:
    html_rows = []
    for d in rows:
        state = d["state"]
        state_text = state
        if d["next_try"] is not None:
            state_text += f", next try in {duration(max(0.0, d['next_try'] - now))}"
        dead = str(d["dead_letters"])
        if d["dead_letters"]:
            dead = f'<a href="/dead-letters?{urlencode({"destination": d["name"]})}">{dead}</a>'
        error = escape(d["last_error"] or "-")
        if d["last_error_at"] is not None:
            error += f' <span class="when">({escape(clock(d["last_error_at"]))})</span>'
        html_rows.append(
            f'<tr id="destination-{escape(d["name"])}" data-state="{escape(state)}">'
            + _cells(
                [
                    escape(d["name"]),
                    f"<code>{escape(d['peer'])}</code>",
                    _badge(state, state_text),
                    f'<span class="num">{d["depth"]}</span>',
                    escape(duration(d["oldest_pending_age"])),
                    dead + " " + _retry_form(d["name"], d["dead_letters"], viewer),
                    f'<span class="error">{error}</span>',
                    _delay(d["delivery_delay"]),
                ]
            )
            + "</tr>"
        )
    return (
        '<section id="destinations"><h2>Destinations</h2>'
        + table(
            [
                "name",
                "peer",
                "state",
                "queue depth",
                "oldest job",
                "dead letters",
                "last error",
                "acknowledgement to delivery",
            ],
            html_rows,
            "no [[destination]] configured",
        )
        + "</section>"
    )


def storage_section(rows: Sequence[Mapping[str, Any]]) -> str:
    html_rows = [
        f'<tr id="storage-{escape(s["name"])}">'
        + _cells(
            [
                escape(s["name"]),
                str(s["pending"] + s["running"]),
                escape(duration(s["oldest_pending_age"])),
                str(s["dead_letters"]),
                f'<span class="error">{escape(s["last_error"] or "-")}</span>',
            ]
        )
        + "</tr>"
        for s in rows
    ]
    return (
        '<section id="storage"><h2>Storage</h2>'
        + table(
            ["name", "queue depth", "oldest job", "dead letters", "last error"],
            html_rows,
            "no [[storage]] configured",
        )
        + "</section>"
    )


_UID = re.compile(r"[0-9]+(\.[0-9]+){3,}")


def _panel_cell(value: str) -> str:
    """A UID may break anywhere (they are long); other text wraps at spaces."""
    if _UID.fullmatch(value):
        return f'<code class="uid">{escape(value)}</code>'
    return escape(value)


def _panel_form(panel: str, row: str, label: str, viewer: Viewer) -> str:
    return (
        '<form class="inline" method="post" action="/actions/panel">'
        f'<input type="hidden" name="csrf" value="{escape(viewer.csrf)}">'
        f'<input type="hidden" name="panel" value="{escape(panel)}">'
        f'<input type="hidden" name="row" value="{escape(row)}">'
        f'<button type="submit">{escape(label)}</button></form>'
    )


def panels_section(panels: Mapping[str, Mapping[str, Any]], viewer: Viewer) -> str:
    """Tables other features add (waiting groups, storage commitments), in their order;
    a panel with an action gets a button per row for a token holder."""
    parts = []
    for key, panel in panels.items():
        acts = bool(viewer.can_act and panel["action"] and panel["row_keys"])
        columns = [*panel["columns"], ""] if acts else panel["columns"]
        rows = []
        for index, row in enumerate(panel["rows"]):
            cells = [_panel_cell(str(v)) for v in row]
            if acts:
                row_key = panel["row_keys"][index] if index < len(panel["row_keys"]) else ""
                cells.append(_panel_form(key, row_key, panel["action"], viewer) if row_key else "")
            rows.append("<tr>" + _cells(cells) + "</tr>")
        note = f'<p class="note">{escape(panel["note"])}</p>' if panel["note"] else ""
        parts.append(
            f'<section id="panel-{escape(key)}"><h2>{escape(panel["title"])}</h2>'
            + table(columns, rows, panel.get("empty", "none"))
            + note
            + "</section>"
        )
    return "".join(parts)


def associations_section(rows: Sequence[Mapping[str, Any]]) -> str:
    html_rows = [
        f'<tr class="outcome-{escape(a["outcome"])}">'
        + _cells(
            [
                escape(clock(a["ended_at"])),
                escape(a["calling_ae_title"]),
                f"<code>{escape(a['address'])}</code>",
                escape(a["outcome"] + (f": {a['reason']}" if a["reason"] else "")),
                escape(a["contexts"] or "-"),
                str(a["instances"]),
                escape(megabytes(a["bytes"])),
                str(a["refused"]),
                escape(duration(a["duration"])),
            ]
        )
        + "</tr>"
        for a in rows
    ]
    return (
        '<section id="associations"><h2>Recent associations</h2>'
        + table(
            [
                "ended",
                "calling AE",
                "address",
                "outcome",
                "contexts",
                "instances",
                "bytes",
                "refused",
                "duration",
            ],
            html_rows,
            "none since the node started",
        )
        + "</section>"
    )


def dead_letters_table(page: Mapping[str, Any], caption: str = "") -> str:
    rows = [
        "<tr>"
        + _cells(
            [
                escape(clock(item["at"])),
                escape(f"{item['kind']} {item['target']}"),
                f'<code class="uid">{escape(item["sop_instance_uid"])}</code>',
                str(item["attempts"]),
                f'<span class="error">{escape(item["error"])}</span>',
            ]
        )
        + "</tr>"
        for item in page["items"]
    ]
    return table(
        ["when", "target", "SOP Instance UID", "attempts", "reason"],
        rows,
        "no dead letters",
        caption=caption,
        cls="dead-letters",
    )


def overview_page(
    data: Mapping[str, Any],
    traffic: Mapping[str, Any],
    dead_letters: Mapping[str, Any],
    viewer: Viewer,
    refresh: int | None,
) -> str:
    now = data["generated_at"]
    shown = len(dead_letters["items"])
    more = (
        f'<p><a href="/dead-letters">all {dead_letters["total"]} dead letters</a></p>'
        if dead_letters["total"] > shown
        else ""
    )
    actions_note = ""
    if not viewer.token_required:
        actions_note = (
            '<p class="note">Read-only: actions (retrying dead letters) need [web] token_file.'
            " The command line does the same: <code>dicom-node queue retry --failed</code>.</p>"
        )
    main = (
        now_section(data["now"])
        + traffic_section(traffic)
        + destinations_section(data["destinations"], viewer, now)
        + storage_section(data["storage"])
        + panels_section(data["panels"], viewer)
        + associations_section(data["associations"])
        + '<section id="dead-letters"><h2>Dead letters</h2>'
        + dead_letters_table(dead_letters, f"newest {shown} of {dead_letters['total']}")
        + more
        + actions_note
        + "</section>"
    )
    title = f"dicom-node {data['now']['ae_title']}"
    return layout(title, main, viewer, refresh, now)


def dead_letters_page(page: Mapping[str, Any], viewer: Viewer, generated_at: float) -> str:
    destination = page["destination"]

    def link(number: int, text: str) -> str:
        query = {"page": number, **({"destination": destination} if destination else {})}
        return f'<a href="/dead-letters?{urlencode(query)}">{escape(text)}</a>'

    nav = []
    if page["page"] > 1:
        nav.append(link(page["page"] - 1, "newer"))
    nav.append(f"page {page['page']} of {page['pages']}")
    if page["page"] < page["pages"]:
        nav.append(link(page["page"] + 1, "older"))
    heading = f"Dead letters for {destination}" if destination else "Dead letters"
    action = _retry_form(destination, page["total"], viewer) if destination else ""
    main = (
        f'<section id="dead-letters"><h2>{escape(heading)}</h2>'
        f'<p class="pager">{" · ".join(nav)} ({page["total"]} in all) {action}</p>'
        + dead_letters_table(page)
        + "</section>"
    )
    return layout("dicom-node: dead letters", main, viewer, None, generated_at)


def login_page(message: str, generated_at: float) -> str:
    """The 401 answer to a browser: a form that trades the token for a session cookie."""
    main = (
        '<section id="login"><h2>Token required</h2>'
        f"<p>{escape(message)}</p>"
        '<form method="post" action="/login">'
        '<label>Token <input type="password" name="token" autocomplete="current-password"'
        ' required></label> <button type="submit">Sign in</button></form>'
        '<p class="note">Scripts send <code>Authorization: Bearer TOKEN</code> instead.</p>'
        "</section>"
    )
    return layout("dicom-node", main, Viewer(), None, generated_at, links=False)


def message_page(title: str, message: str, generated_at: float) -> str:
    main = f'<section><h2>{escape(title)}</h2><p>{escape(message)}</p><p><a href="/">back</a></p></section>'
    return layout("dicom-node", main, Viewer(), None, generated_at)
