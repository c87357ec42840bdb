"""Traffic charts drawn on the server as SVG: they need no script and no library, so they
show with JavaScript off and load nothing from outside the node."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

WIDTH = 300
HEIGHT = 70  # of the plot; the time axis' labels go below it
LABELS = 12
TOP = 13  # room above the tallest bar, for the peak label


def _bar_title(minutes_ago: int, value: float, unit: str) -> str:
    when = "this minute" if minutes_ago == 0 else f"{minutes_ago} min ago"
    shown = f"{value:.1f}" if unit == "MB" else f"{value:.0f}"
    return f"{when}: {shown} {unit}"


def _peak(peak: float, unit: str) -> str:
    return f"{peak:.1f} {unit}" if unit == "MB" else f"{peak:.0f}"


def bar_chart(flow: str, unit: str, values: Sequence[float]) -> str:
    """One bar per minute, oldest on the left, the current minute on the right; every bar
    has a tooltip, and the SVG carries its total and peak as data attributes."""
    count = len(values)
    peak = max(values, default=0)
    total = sum(values)
    slot = WIDTH / max(count, 1)
    bars = []
    for index, value in enumerate(values):
        if value <= 0:
            continue
        height = max(1.0, (HEIGHT - TOP) * value / peak)
        x = index * slot
        bars.append(
            f'<rect class="bar {escape(flow)}" x="{x:.1f}" y="{HEIGHT - height:.1f}"'
            f' width="{max(slot - 1, 1):.1f}" height="{height:.1f}">'
            f"<title>{escape(_bar_title(count - 1 - index, value, unit))}</title></rect>"
        )
    shown_total = f"{total:.1f}" if unit == "MB" else f"{total:.0f}"
    label = f"{flow}, {unit} per minute over the last {count} minutes: {shown_total} in all"
    return (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT + LABELS}" width="{WIDTH}"'
        f' height="{HEIGHT + LABELS}"'
        f' role="img" aria-label="{escape(label)}" data-flow="{escape(flow)}"'
        f' data-unit="{escape(unit)}" data-total="{shown_total}" data-peak="{peak:g}">'
        f"<title>{escape(label)}</title>"
        f'<line class="axis" x1="0" y1="{HEIGHT - 0.5}" x2="{WIDTH}" y2="{HEIGHT - 0.5}"/>'
        + "".join(bars)
        + f'<text class="tick" x="1" y="{HEIGHT + LABELS - 2}">{count} min ago</text>'
        + f'<text class="tick end" x="{WIDTH - 1}" y="{HEIGHT + LABELS - 2}">now</text>'
        + f'<text class="tick end" x="{WIDTH - 1}" y="10">peak {_peak(peak, unit)}</text>'
        + "</svg>"
    )
