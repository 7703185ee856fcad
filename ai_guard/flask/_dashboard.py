"""The dashboard: one server-rendered HTML page with SVG charts, no build step, no CDN.

The charts are drawn here, in Python, as SVG elements: latency percentiles per tier over
time (with the tier's p95 target), traffic by tier (stacked bars, errors as marks),
cumulative cost with the projected month against its target, plus the SLO table, the
breakers and their recent transitions, and the figures per model. Every data-bearing
element carries ``data-series`` (``latency-mini-p95``, ``traffic-full``, ``cost-cumulative``
...), ``data-t`` (epoch seconds of the interval) and ``data-value`` attributes, so tests and
scripts can read the figures from the DOM.

Escaping: the SVG is built by :func:`element`, which escapes every attribute value and
text; the page is a Jinja template rendered with autoescaping on (a private environment,
so an app's Jinja settings cannot turn it off). Model names, breaker names and reasons
are user data and are never trusted.

The page refreshes itself every ``AI_GUARD_DASHBOARD_REFRESH`` seconds with a few lines
of inline JavaScript (fetch the page, swap the board: no flicker, scroll kept), or a
``<meta refresh>`` when scripts are off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2
from markupsafe import Markup, escape

from ai_guard.flask._extension import AIGuardState

__all__ = [
    "Chart",
    "Series",
    "bar_chart",
    "element",
    "format_ms",
    "format_usd",
    "line_chart",
    "render_dashboard",
]

#: Most points a chart shows; the step between points grows with the window.
MAX_POINTS = 60
#: A chart of a collector that just started covers at least this many intervals (and
#: at least MIN_SPAN_SECONDS), rather than one dot at the right edge of an hour.
MIN_POINTS = 20
MIN_SPAN_SECONDS = 30.0
FINE_SPAN_SECONDS = 300.0
COARSE_STEP_SECONDS = 60.0

WIDTH, HEIGHT = 600, 230
LEFT, RIGHT, TOP, BOTTOM = 56, 14, 14, 30

COLORS = {
    "mini": "#0d9488",
    "full": "#6366f1",
    "other": "#98a2b3",
    "errors": "#e5484d",
    "cost": "#d97706",
}
_PERCENTILE_COLORS = {
    "mini": {"p50": "#5eead4", "p95": "#0d9488", "p99": "#134e4a"},
    "full": {"p50": "#a5b4fc", "p95": "#6366f1", "p99": "#312e81"},
}

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("ai_guard.flask", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


# -- formatting -------------------------------------------------------------------------------


def format_ms(value: float | None) -> str:
    """``412.3 -> "412 ms"``, ``1834 -> "1.83 s"``, ``None -> "—"``."""
    if value is None:
        return "—"
    if value < 1:
        return f"{value:.2f} ms"
    if value < 1000:
        return f"{value:.0f} ms"
    return f"{value / 1000:.3g} s"


def format_usd(value: float | None) -> str:
    """Dollars with the precision small amounts need: ``$12.35``, ``$0.0123``."""
    if value is None:
        return "—"
    if value == 0:
        return "$0"
    if value >= 100:
        return f"${value:,.0f}"
    if value >= 1:
        return f"${value:,.2f}"
    return f"${value:.3g}"


def format_ratio(value: float | None, *, digits: int = 1) -> str:
    """A fraction as a percentage: ``0.9912 -> "99.1 %"``."""
    if value is None:
        return "—"
    return f"{value * 100:.{digits}f} %"


def format_count(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{int(value):,}"


def format_compact(value: float | None) -> str:
    """``1996800 -> "2.0M"``, ``43120 -> "43.1k"``, ``512 -> "512"``."""
    if value is None:
        return "—"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{int(value)}"


def format_ago(seconds: float) -> str:
    """``0 -> "now"``, ``90 -> "-1.5m"``, ``3600 -> "-60m"``, ``20 -> "-20s"``."""
    if seconds < 0.5:
        return "now"
    if seconds < 120:
        return f"-{seconds:.0f}s"
    minutes = seconds / 60
    return f"-{minutes:.0f}m" if minutes >= 10 or minutes == int(minutes) else f"-{minutes:.1f}m"


def format_slo_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ms":
        return format_ms(value)
    if unit == "ratio":
        return format_ratio(value, digits=2)
    if unit == "percent":
        return f"{value:.1f} %"
    if unit == "USD":
        return format_usd(value)
    return f"{value:g}"


def format_clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(epoch))


# -- SVG --------------------------------------------------------------------------------------

_VOID = frozenset({"circle", "line", "path", "rect", "stop"})


def _attribute(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".") if math.isfinite(value) else "0"
    return str(value)


def element(tag: str, attributes: Mapping[str, object] | None = None, *children: object) -> Markup:
    """One SVG/HTML element; attribute values and text children are escaped, ``Markup``
    children (elements built here) are kept. ``None`` attributes are left out."""
    parts = [f"<{tag}"]
    for name, value in (attributes or {}).items():
        if value is None:
            continue
        parts.append(f' {name}="{escape(_attribute(value))}"')
    if not children and tag in _VOID:
        return Markup("".join(parts) + "/>")
    inner = "".join(str(escape(child)) for child in children)
    return Markup("".join(parts) + ">" + inner + f"</{tag}>")


@dataclass(frozen=True)
class Series:
    """One line (or bar stack layer) of a chart: ``key`` becomes ``data-series``."""

    key: str
    label: str
    color: str
    values: Sequence[float | None]
    width: float = 2.0
    dash: str | None = None


@dataclass(frozen=True)
class Chart:
    """A rendered chart: the SVG and its legend (label, color, dashed)."""

    svg: Markup
    legend: list[tuple[str, str, bool]] = field(default_factory=list)
    empty: bool = False
    note: str | None = None


def nice_ceiling(value: float, ticks: int = 4) -> tuple[float, float]:
    """An upper bound >= ``value`` and a tick step (1, 2, 2.5 or 5 x 10^k)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0, 0.25
    raw = value / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        step = factor * magnitude
        if step >= raw - 1e-12:
            break
    return step * math.ceil(value / step - 1e-9), step


class _Frame:
    """The plot area of one chart: maps (index, value) to SVG coordinates."""

    def __init__(self, points: int, upper: float) -> None:
        self.points = max(points, 1)
        self.upper = upper
        self.x0, self.x1 = LEFT, WIDTH - RIGHT
        self.y0, self.y1 = TOP, HEIGHT - BOTTOM
        self.slot = (self.x1 - self.x0) / self.points

    def x(self, index: int) -> float:
        return self.x0 + (index + 0.5) * self.slot

    def y(self, value: float) -> float:
        share = min(max(value / self.upper, 0.0), 1.0) if self.upper > 0 else 0.0
        return self.y1 - share * (self.y1 - self.y0)


def _axes(
    frame: _Frame,
    step: float,
    times: Sequence[float],
    now: float,
    fmt: Callable[[float], str],
) -> list[Markup]:
    """Grid lines with value ticks, and time ticks saying how long ago each interval
    ended (``now`` is the end of the last interval)."""
    interval = (now - times[-1]) if times else 0.0
    parts: list[Markup] = []
    tick = 0.0
    while tick <= frame.upper + 1e-9:
        y = frame.y(tick)
        parts.append(
            element(
                "line",
                {"x1": frame.x0, "x2": frame.x1, "y1": y, "y2": y, "class": "grid"},
            )
        )
        parts.append(
            element(
                "text",
                {"x": frame.x0 - 6, "y": y + 4, "text-anchor": "end", "class": "tick"},
                _tick_label(fmt, tick, step),
            )
        )
        tick += step
    if times:
        count = len(times)
        marks = sorted({0, count // 4, count // 2, (3 * count) // 4, count - 1})
        for index in marks:
            parts.append(
                element(
                    "text",
                    {
                        "x": frame.x(index),
                        "y": frame.y1 + 18,
                        "text-anchor": "middle",
                        "class": "tick",
                    },
                    format_ago(max(0.0, now - times[index] - interval)),
                )
            )
    parts.append(
        element(
            "line",
            {"x1": frame.x0, "x2": frame.x1, "y1": frame.y1, "y2": frame.y1, "class": "axis"},
        )
    )
    return parts


def _tick_label(fmt: Callable[[float], str], value: float, step: float) -> str:
    if value == 0:
        return "0"
    if fmt is format_usd:
        # As many decimals as the step needs ($0.025 steps: 3), the same on every tick.
        decimals = next((d for d in range(8) if abs(round(step, d) - step) < step * 1e-6), 8)
        return f"${value:,.{decimals}f}"
    return fmt(value)


def _svg(label: str, parts: Iterable[Markup], *, chart: str) -> Markup:
    return element(
        "svg",
        {
            "viewBox": f"0 0 {WIDTH} {HEIGHT}",
            "role": "img",
            "aria-label": label,
            "class": "chart",
            "data-chart": chart,
            "preserveAspectRatio": "xMidYMid meet",
        },
        *parts,
    )


def _empty(label: str, chart: str, message: str) -> Chart:
    text = element(
        "text",
        {"x": WIDTH / 2, "y": HEIGHT / 2, "text-anchor": "middle", "class": "empty-text"},
        message,
    )
    return Chart(_svg(label, [text], chart=chart), empty=True)


def line_chart(
    label: str,
    chart: str,
    times: Sequence[float],
    now: float,
    series: Sequence[Series],
    *,
    fmt: Callable[[float], str],
    target: float | None = None,
    target_label: str | None = None,
    area: bool = False,
    empty_message: str = "No data yet",
) -> Chart:
    """Lines over time; ``None`` values leave gaps. A ``target`` inside the data's range
    (or up to 2.5x above it) is drawn as a dashed line, one further up is named in a note
    so it does not flatten the lines."""
    values = [v for s in series for v in s.values if v is not None]
    if not values:
        return _empty(label, chart, empty_message)
    top = max(values)
    note = None
    if target is not None and target <= max(top, 1e-12) * 2.5:
        top = max(top, target)
    elif target is not None:
        note = f"{target_label or 'target'} {fmt(target)} is above this scale"
    upper, step = nice_ceiling(top * 1.08)
    frame = _Frame(len(times), upper)
    parts = _axes(frame, step, times, now, fmt)
    if target is not None and note is None:
        y = frame.y(target)
        parts.append(
            element(
                "line",
                {
                    "x1": frame.x0,
                    "x2": frame.x1,
                    "y1": y,
                    "y2": y,
                    "class": "target",
                    "data-series": f"{chart}-target",
                    "data-value": target,
                },
            )
        )
        parts.append(
            element(
                "text",
                {"x": frame.x1 - 4, "y": y - 5, "text-anchor": "end", "class": "target-label"},
                f"{target_label or 'target'} {fmt(target)}",
            )
        )
    legend: list[tuple[str, str, bool]] = []
    for line in series:
        legend.append((line.label, line.color, line.dash is not None))
        segments: list[list[tuple[float, float]]] = []
        current: list[tuple[float, float]] = []
        for index, value in enumerate(line.values):
            if value is None:
                if current:
                    segments.append(current)
                current = []
                continue
            current.append((frame.x(index), frame.y(value)))
        if current:
            segments.append(current)
        for segment in segments:
            d = "M" + " L".join(f"{x:.1f} {y:.1f}" for x, y in segment)
            if area and len(segment) > 1:
                fill_d = (
                    d + f" L{segment[-1][0]:.1f} {frame.y1:.1f} L{segment[0][0]:.1f} "
                    f"{frame.y1:.1f} Z"
                )
                parts.append(
                    element(
                        "path",
                        {
                            "d": fill_d,
                            "fill": line.color,
                            "fill-opacity": "0.12",
                            "stroke": "none",
                            "class": "area",
                        },
                    )
                )
            parts.append(
                element(
                    "path",
                    {
                        "d": d,
                        "fill": "none",
                        "stroke": line.color,
                        "stroke-width": line.width,
                        "stroke-dasharray": line.dash,
                        "stroke-linejoin": "round",
                        "stroke-linecap": "round",
                        "data-series": line.key,
                    },
                )
            )
        for index, value in enumerate(line.values):
            if value is None:
                continue
            parts.append(
                element(
                    "circle",
                    {
                        "cx": frame.x(index),
                        "cy": frame.y(value),
                        "r": 2.6,
                        "fill": line.color,
                        "data-series": line.key,
                        "data-t": f"{times[index]:.0f}",
                        "data-value": f"{value:.6g}",
                    },
                    element(
                        "title",
                        None,
                        f"{line.label}: {fmt(value)} ({format_ago(now - times[index])})",
                    ),
                )
            )
    return Chart(_svg(label, parts, chart=chart), legend=legend, note=note)


def bar_chart(
    label: str,
    chart: str,
    times: Sequence[float],
    now: float,
    stacks: Sequence[Series],
    *,
    overlay: Series | None = None,
    fmt: Callable[[float], str] = format_count,
    empty_message: str = "No traffic yet",
) -> Chart:
    """Stacked bars per interval (``stacks`` bottom first) and an optional line over them."""
    totals = [sum((s.values[i] or 0.0) for s in stacks) for i in range(len(times))]
    overlay_values = [v for v in (overlay.values if overlay else []) if v is not None]
    top = max([*totals, *overlay_values, 0.0])
    if top <= 0:
        return _empty(label, chart, empty_message)
    upper, step = nice_ceiling(top * 1.08)
    frame = _Frame(len(times), upper)
    parts = _axes(frame, step, times, now, fmt)
    legend: list[tuple[str, str, bool]] = []
    bar_width = max(frame.slot * 0.72, 1.0)
    for index in range(len(times)):
        base = 0.0
        for layer in stacks:
            value = layer.values[index] or 0.0
            if value <= 0:
                continue
            y_top = frame.y(base + value)
            y_bottom = frame.y(base)
            parts.append(
                element(
                    "rect",
                    {
                        "x": frame.x(index) - bar_width / 2,
                        "y": y_top,
                        "width": bar_width,
                        "height": max(y_bottom - y_top, 0.5),
                        "rx": min(2.0, bar_width / 4),
                        "fill": layer.color,
                        "data-series": layer.key,
                        "data-t": f"{times[index]:.0f}",
                        "data-value": f"{value:.6g}",
                    },
                    element(
                        "title",
                        None,
                        f"{layer.label}: {fmt(value)} ({format_ago(now - times[index])})",
                    ),
                )
            )
            base += value
    legend.extend((layer.label, layer.color, False) for layer in stacks)
    if overlay is not None and overlay_values:
        # Only the intervals with errors get a mark: a line along zero would be noise.
        points = [(frame.x(i), frame.y(v), i, v) for i, v in enumerate(overlay.values) if v]
        if points:
            for x, y, index, value in points:
                parts.append(
                    element(
                        "circle",
                        {
                            "cx": x,
                            "cy": y,
                            "r": 3.2,
                            "fill": overlay.color,
                            "data-series": overlay.key,
                            "data-t": f"{times[index]:.0f}",
                            "data-value": f"{value:.6g}",
                        },
                        element("title", None, f"{overlay.label}: {fmt(value)}"),
                    )
                )
        legend.append((overlay.label, overlay.color, False))
    return Chart(_svg(label, parts, chart=chart), legend=legend)


def gauge(value: float | None, target: float | None, *, key: str) -> Markup:
    """A horizontal bar: ``value`` against ``target`` (full width = 1.25 x target)."""
    width, height = 600, 34
    parts = [
        element(
            "rect", {"x": 0, "y": 8, "width": width, "height": 14, "rx": 7, "class": "gauge-track"}
        )
    ]
    if value is not None and target:
        scale = target * 1.25
        share = min(value / scale, 1.0)
        color = "#16a34a" if value <= target else "#dc2626"
        parts.append(
            element(
                "rect",
                {
                    "x": 0,
                    "y": 8,
                    "width": max(share * width, 2.0),
                    "height": 14,
                    "rx": 7,
                    "fill": color,
                    "data-series": key,
                    "data-value": f"{value:.6g}",
                },
            )
        )
    if target:
        x = width / 1.25
        parts.append(
            element(
                "line",
                {
                    "x1": x,
                    "x2": x,
                    "y1": 2,
                    "y2": 28,
                    "class": "gauge-target",
                    "data-series": f"{key}-target",
                    "data-value": target,
                },
            )
        )
    return element(
        "svg",
        {
            "viewBox": f"0 0 {width} {height}",
            "class": "gauge",
            "role": "img",
            "aria-label": "projected monthly cost against target",
        },
        *parts,
    )


# -- the page ---------------------------------------------------------------------------------


def _chart_span(window: float, observed: float, resolution: float) -> tuple[float, float]:
    """(span, step) of the charts: the window, shortened to the time the collector has
    existed (a young collector would otherwise show one dot at the right edge)."""
    span = min(window, max(MIN_SPAN_SECONDS, MIN_POINTS * resolution, observed + resolution))
    slot = resolution if span <= FINE_SPAN_SECONDS else COARSE_STEP_SECONDS
    span = slot * math.ceil(span / slot - 1e-9)
    step = slot * max(1, math.ceil(span / slot / MAX_POINTS - 1e-9))
    return span, step


_OBJECTIVES = {"<=": "\u2264", ">=": "\u2265"}


def _status_class(met: bool | None) -> str:
    return "na" if met is None else "ok" if met else "bad"


def _banner(slos: Mapping[str, Any], health: Mapping[str, Any], total: int) -> dict[str, str]:
    missed = [s for s in slos["slos"] if s["met"] is False]
    if health["critical_open"]:
        names = ", ".join(health["critical_open"])
        return {"level": "bad", "text": f"Critical circuit open: {names}"}
    if slos["alert"] == "page":
        return {"level": "bad", "text": "Error budget burning fast (page)"}
    if total == 0:
        return {"level": "na", "text": "No AI calls recorded yet"}
    if missed:
        count = len(missed)
        return {"level": "warn", "text": f"{count} SLO{'s' if count > 1 else ''} missed"}
    if health["status"] != "ok":
        return {"level": "warn", "text": "A circuit is not closed"}
    if slos["all_met"] is None:
        return {"level": "ok", "text": "No SLO missed (some without data yet)"}
    return {"level": "ok", "text": "All SLOs met"}


def _window_label(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def dashboard_context(state: AIGuardState, *, window: float, app_name: str) -> dict[str, Any]:
    """Everything the template shows (raises ``ValueError`` for a window the collector
    cannot answer for)."""
    collector = state.collector
    report = collector.report(window)
    slos = collector.slo_status(window)
    health, _ = state.health()
    now = float(report["until"])
    observed_total = collector.report(None)["observed_seconds"]
    span, step = _chart_span(window, float(observed_total), collector.resolution)
    points = collector.timeseries(span, step)
    times = [float(p["t"]) for p in points]
    now_edge = times[-1] + step if times else now
    total = int(report["total_requests"])
    targets = collector.slos.latency_p95_ms

    latency_charts = []
    for tier in ("mini", "full"):
        colors = _PERCENTILE_COLORS[tier]
        series = [
            Series(
                key=f"latency-{tier}-{q}",
                label=q,
                color=colors[q],
                values=[p["latency_ms"].get(tier, {}).get(q) for p in points],
                width=2.4 if q == "p95" else 1.6,
                dash="4 3" if q == "p99" else None,
            )
            for q in ("p50", "p95", "p99")
        ]
        latency_charts.append(
            {
                "tier": tier,
                "chart": line_chart(
                    f"{tier} tier latency percentiles",
                    f"latency-{tier}",
                    times,
                    now_edge,
                    series,
                    fmt=format_ms,
                    target=targets.get(tier),
                    target_label="p95 target",
                    empty_message=f"No {tier}-tier calls in this window",
                ),
            }
        )

    tiers_seen = sorted(
        {name for p in points for name, n in p["requests_by_tier"].items() if n} - {"mini", "full"}
    )
    stacks = [
        Series(
            "traffic-mini",
            "mini",
            COLORS["mini"],
            [float(p["requests_by_tier"].get("mini", 0)) for p in points],
        ),
        Series(
            "traffic-full",
            "full",
            COLORS["full"],
            [float(p["requests_by_tier"].get("full", 0)) for p in points],
        ),
    ]
    if tiers_seen:
        stacks.append(
            Series(
                "traffic-other",
                "other",
                COLORS["other"],
                [float(sum(p["requests_by_tier"].get(t, 0) for t in tiers_seen)) for p in points],
            )
        )
    errors = Series(
        "traffic-errors",
        "errors",
        COLORS["errors"],
        [float(p["errors"]) for p in points],
        width=1.8,
    )
    traffic = bar_chart(
        "requests per interval by tier", "traffic", times, now_edge, stacks, overlay=errors
    )

    running = 0.0
    cumulative: list[float | None] = []
    for p in points:
        running += float(p["cost_usd"])
        cumulative.append(running)
    cost = line_chart(
        "cumulative cost",
        "cost",
        times,
        now_edge,
        [
            Series(
                "cost-cumulative",
                "cost (cumulative)",
                COLORS["cost"],
                cumulative if running > 0 else [None] * len(points),
            )
        ],
        fmt=format_usd,
        area=True,
        empty_message="No spend in this window",
    )
    monthly_target = collector.slos.monthly_cost_usd
    projected = report["projected_monthly_cost_usd"]

    slo_rows = []
    by_name = {}
    for result in slos["slos"]:
        by_name[result["name"]] = result
        rates = result["burn_rates"] or {}
        slo_rows.append(
            {
                "name": result["name"],
                "description": result["description"],
                "target": f"{_OBJECTIVES[result['objective']]} "
                f"{format_slo_value(result['target'], result['unit'])}",
                "actual": format_slo_value(result["actual"], result["unit"]),
                "met": result["met"],
                "status": _status_class(result["met"]),
                "status_text": "no data"
                if result["met"] is None
                else "met"
                if result["met"]
                else "missed",
                "alert": result["alert"],
                "burn": [
                    (label, "—" if rate is None else f"{rate:.2f}") for label, rate in rates.items()
                ],
            }
        )

    def verdict(name: str) -> str:
        result = by_name.get(name)
        return _status_class(result["met"]) if result else "na"

    latency = report["latency_ms"]
    tiles = [
        {
            "label": "Requests",
            "value": format_count(total),
            "sub": f"{report['error_count']:,} errors · {report['retries']:,} retries",
            "status": "na",
        },
        {
            "label": "Mini tier share",
            "value": "—"
            if report["mini_percentage"] is None
            else f"{report['mini_percentage']:.1f} %",
            "sub": f"{report['mini_requests']:,} mini · {report['full_requests']:,} full",
            "status": verdict("mini_usage"),
        },
        {
            "label": "Availability",
            "value": format_ratio(report["availability"], digits=2),
            "sub": f"error rate {format_ratio(report['error_rate'], digits=2)}",
            "status": verdict("availability"),
        },
        {
            "label": "Cache hit rate",
            "value": format_ratio(report["cache_hit_rate"]),
            "sub": f"{format_compact(report['cached_tokens'])} of "
            f"{format_compact(report['input_tokens'])} tokens",
            "status": verdict("cache_hit_rate"),
        },
        {
            "label": "p95 latency",
            "value": f"{format_ms(latency['mini']['p95'])}",
            "sub": f"mini · full {format_ms(latency['full']['p95'])}",
            "status": "bad"
            if "bad" in (verdict("latency_p95_mini"), verdict("latency_p95_full"))
            else verdict("latency_p95_mini"),
        },
        {
            "label": "Cost",
            "value": format_usd(report["total_cost_usd"]),
            "sub": "projection after 1 min"
            if projected is None
            else f"projected {format_usd(projected)}/month",
            "status": verdict("monthly_cost"),
        },
    ]

    breakers = []
    for entry in health["breakers"]:
        metrics = entry["metrics"] or {}
        breakers.append(
            {
                "name": entry["name"],
                "state": entry["state"],
                "critical": entry["critical"],
                "failures": metrics.get("failures_in_window"),
                "calls": metrics.get("calls_in_window"),
                "rejected": metrics.get("rejected"),
                "opened": state.transition_count(entry["name"], "open"),
                "retry_after": metrics.get("retry_after") or 0.0,
                "error": entry.get("error"),
            }
        )
    transitions = [{**t, "clock": format_clock(t["at"])} for t in state.recent_transitions()[:15]]
    models = [
        {
            "name": name,
            "tier": figures["tier"],
            "requests": format_count(figures["requests"]),
            "errors": format_count(figures["errors"]),
            "input": format_count(figures["input_tokens"]),
            "cached": format_count(figures["cached_tokens"]),
            "output": format_count(figures["output_tokens"]),
            "cost": format_usd(figures["cost_usd"]),
            "p95": format_ms(figures["latency_ms"]["p95"]),
        }
        for name, figures in report["by_model"].items()
    ]
    windows = sorted({300.0, 900.0, 3600.0, float(state.config.dashboard_window)})
    return {
        "app_name": app_name,
        "window": window,
        "window_label": _window_label(window),
        "span_label": _window_label(span),
        "windows": [
            {"seconds": f"{w:g}", "label": _window_label(w), "active": w == window}
            for w in windows
            if w <= max(collector.windows) + 1e-9
        ],
        "updated": format_clock(now),
        "refresh": state.config.dashboard_refresh,
        "banner": _banner(slos, health, total),
        "tiles": tiles,
        "latency_charts": latency_charts,
        "traffic": traffic,
        "cost": cost,
        "cost_gauge": gauge(projected, monthly_target, key="cost-projected"),
        "projected": format_usd(projected),
        "projected_known": projected is not None,
        "monthly_target": format_usd(monthly_target),
        "total_cost": format_usd(report["total_cost_usd"]),
        "slo_rows": slo_rows,
        "breakers": breakers,
        "transitions": transitions,
        "models": models,
        "total": total,
        "prefix": state.url_prefix,
    }


def render_dashboard(state: AIGuardState, *, window: float, nonce: str, app_name: str) -> str:
    """The dashboard page of ``state``'s app over the last ``window`` seconds."""
    context = dashboard_context(state, window=window, app_name=app_name)
    return _ENVIRONMENT.get_template("dashboard.html").render(nonce=nonce, **context)
