"""The status page's data, as JSON-ready dicts: the API serves them as they are and the
HTML pages render the same dicts, so page and API cannot disagree.

No patient data: AE titles, addresses, counts, SOP Instance UIDs and error texts
(which name UIDs and statuses, never patient attributes).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from node.config.model import DestinationConfig
from node.jobs.model import (
    GroupReport,
    GroupState,
    JobKind,
    JobState,
    TargetReport,
    TargetSummary,
    group_due,
    group_waits_for,
    summarise_targets,
)
from node.web.pages import duration
from node.web.status import configured_targets
from node.web.traffic import WINDOW
from node.web.view import Hold, Live, NodeView, Panel

DEAD_LETTERS_PER_PAGE = 25
MAX_PER_PAGE = 200


def redact_paths(text: str | None, roots: Sequence[Path]) -> str | None:
    """An error text without the part of a stored file's path below its storage root: the
    layout puts patient attributes there ({PatientID}/...), and the page shows none."""
    if not text:
        return text
    for root in roots:
        text = re.sub(re.escape(str(root)) + r"/[^'\"\s:]*", f"{root}/…", text)
    return text


def _storage_roots(view: NodeView) -> list[Path]:
    # An S3 target has no path: nothing of its to hide.
    return [storage.path for storage in view.config().storage if storage.path is not None]


def overview(view: NodeView, now: float | None = None) -> dict[str, Any]:
    """Everything the front page shows, read once."""
    now = time.time() if now is None else now
    config = view.config()
    live = view.live()
    rows = view.queue().report()
    summaries = summarise_targets(rows, configured_targets(config))
    return {
        "generated_at": now,
        "now": now_section(view, live, now),
        "destinations": destination_rows(view, live, rows, summaries, now),
        "storage": storage_rows(summaries, now, _storage_roots(view)),
        "associations": [dataclasses.asdict(r) for r in view.recent_associations().newest_first()],
        "panels": {
            panel.key: {
                "title": panel.title,
                "empty": panel.empty,
                "columns": list(panel.columns),
                "rows": [list(row) for row in panel.rows],
                "note": panel.note,
                "action": panel.action,
                "row_keys": list(panel.row_keys),
            }
            for panel in [*builtin_panels(view, now), *view.panels()]
        },
    }


def now_section(view: NodeView, live: Live, now: float) -> dict[str, Any]:
    config = view.config()
    minimum = config.limits.min_free_space
    return {
        "ae_title": config.node.ae_title,
        "dicom_port": config.node.port,
        "phase": live.phase,
        "version": live.version,
        "started_at": live.started_at,
        "uptime_seconds": max(0.0, now - live.started_at),
        "associations_open": live.associations_open,
        "min_free_space": minimum,
        "folders": [
            {
                "role": folder.role,
                "path": str(folder.path),
                "free": folder.free,
                "low": folder.free is not None and folder.free < minimum,
            }
            for folder in live.folders
        ],
    }


def destination_state(
    hold: Hold | None,
    summary: TargetSummary,
    next_due: float | None,
    now: float,
    in_groups: int = 0,
) -> tuple[str, float | None]:
    """idle, sending, held (the destination backs off an unreachable peer) or waiting (its
    jobs are scheduled for a retry later, or wait in a series or study group), with the
    time of the next try."""
    if hold is not None and hold.until > now:
        return "held", hold.until
    if summary.running:
        return "sending", None
    if summary.pending > in_groups:
        if next_due is not None and next_due > now:
            return "waiting", next_due
        return "sending", None
    if summary.pending:
        return "waiting", None  # every pending job waits for its group's trigger
    return "idle", None


def _next_due(rows: list[TargetReport]) -> dict[tuple[str, str], float | None]:
    return {(r.kind, r.target): r.next_attempt_at for r in rows if r.state == JobState.PENDING}


def _in_groups(rows: list[TargetReport]) -> dict[tuple[str, str], int]:
    return {(r.kind, r.target): r.count for r in rows if r.state == JobState.WAITING}


def _age(then: float | None, now: float) -> float | None:
    return None if then is None else max(0.0, now - then)


def destination_rows(
    view: NodeView,
    live: Live,
    rows: list[TargetReport],
    summaries: list[TargetSummary],
    now: float,
) -> list[dict[str, Any]]:
    config = view.config()
    by_name = {s.target: s for s in summaries if s.kind == JobKind.FORWARD}
    due = _next_due(rows)
    grouped = _in_groups(rows)
    delays = view.delivery_delays()
    roots = _storage_roots(view)
    result = []
    for destination in config.destinations:
        summary = by_name.get(destination.name) or TargetSummary("forward", destination.name)
        hold = live.holds.get(destination.name)
        key = ("forward", destination.name)
        state, next_try = destination_state(hold, summary, due.get(key), now, grouped.get(key, 0))
        result.append(
            {
                "name": destination.name,
                "peer": peer_of(destination),
                "state": state,
                "next_try": next_try,
                "failed_attempts_in_a_row": hold.streak if hold and state == "held" else 0,
                "pending": summary.pending,
                "running": summary.running,
                "depth": summary.pending + summary.running,
                "in_groups": grouped.get(key, 0),
                "dead_letters": summary.failed,
                "oldest_pending": summary.oldest_pending,
                "oldest_pending_age": _age(summary.oldest_pending, now),
                "last_error": redact_paths(summary.last_error, roots),
                "last_error_at": summary.last_error_at,
                "delivery_delay": dataclasses.asdict(delays.summary(destination.name, now)),
            }
        )
    return result


def peer_of(destination: DestinationConfig) -> str:
    """AE@host:port, or a DICOMweb destination's URL without any user:password in it."""
    if destination.protocol == "dicomweb":
        parts = urlsplit(destination.url)
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def storage_rows(
    summaries: list[TargetSummary], now: float, roots: Sequence[Path] = ()
) -> list[dict[str, Any]]:
    return [
        {
            "name": s.target,
            "pending": s.pending,
            "running": s.running,
            "dead_letters": s.failed,
            "oldest_pending_age": _age(s.oldest_pending, now),
            "last_error": redact_paths(s.last_error, roots),
            "last_error_at": s.last_error_at,
        }
        for s in summaries
        if s.kind == JobKind.STORE
    ]


def traffic(view: NodeView, now: float | None = None) -> dict[str, Any]:
    ring = view.traffic()
    return {
        "window_minutes": WINDOW,
        "minutes": [dataclasses.asdict(m) for m in ring.minutes(now)],
        "totals": ring.totals(now),
    }


def dead_letter_page(
    view: NodeView, destination: str | None, page: int, per_page: int = DEAD_LETTERS_PER_PAGE
) -> dict[str, Any]:
    """One page of dead letters, newest first; forward jobs only when a destination is given."""
    per_page = min(max(1, per_page), MAX_PER_PAGE)
    kind = JobKind.FORWARD if destination else None
    queue = view.queue()
    total = queue.count_dead_letters(kind, destination)
    pages = max(1, math.ceil(total / per_page))
    page = min(max(1, page), pages)
    items = queue.dead_letters(kind, destination, (page - 1) * per_page, per_page)
    return {
        "destination": destination,
        "total": total,
        "page": page,
        "pages": pages,
        "per_page": per_page,
        "items": [
            {**dataclasses.asdict(item), "error": redact_paths(item.error, _storage_roots(view))}
            for item in items
        ],
    }


GROUP_COLUMNS = (
    "route",
    "target",
    "level",
    "Study Instance UID",
    "Series Instance UID",
    "version",
    "state",
    "instances",
    "first arrival",
    "due",
    "note",
)


def builtin_panels(view: NodeView, now: float) -> list[Panel]:
    """The node's own extra tables: series and study groups, when a route has a trigger or
    a group is still open."""
    queue = view.queue()
    groups = [*queue.waiting_groups(), *queue.dispatched_groups()]
    triggered = any(route.trigger != "instance" for route in view.config().routes)
    if not groups and not triggered:
        return []
    return [
        Panel(
            "groups",
            "Waiting groups",
            GROUP_COLUMNS,
            rows=[_group_row(group, now) for group in groups],
            empty="no series or study group is waiting",
            note="A group is sent when it is stable (see the route's trigger);"
            " Release sends it now, as `dicom-node queue release` does.",
            action="Release",
            row_keys=[release_key(group) for group in groups],
        )
    ]


def release_key(group: GroupReport) -> str:
    """What identifies a waiting or held group to release it; "" once it is dispatched."""
    if group.state not in (GroupState.WAITING, GroupState.HELD):
        return ""
    uid = group.study_instance_uid if group.level == "study" else group.series_instance_uid
    return f"{group.level}:{uid}:{group.target}"


def _group_row(group: GroupReport, now: float) -> list[str]:
    at, reason = group_due(group)
    waits_for = group_waits_for(group)
    if group.state == GroupState.DISPATCHED:
        due, note = "sending", group.reason
    elif at is None:
        due, note = "-", waits_for or "waits for force_after"
    else:
        due = "now" if at <= now else f"in {duration(at - now)}"
        note = f"{reason}; {waits_for}" if waits_for else reason
    return [
        group.route,
        f"{group.kind} {group.target}",
        group.level,
        group.study_instance_uid,
        group.series_instance_uid or "-",
        str(group.version),
        group.state,
        str(group.members),
        f"{duration(now - group.first_arrival_at)} ago",
        due,
        note,
    ]
