"""Plotly figure specs (plain ``{"data", "layout"}`` dicts) for the dashboard's charts.

Pages embed them as JSON; ``static/kiln.js`` draws them with the plotly.js that the
plotly package ships. Nothing here imports plotly: a figure is just data, typed below
as the subset of plotly's schema these charts use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import isfinite
from typing import Any, Literal, NotRequired, TypedDict, Unpack

from kiln.monitor.live import SeriesPoint

Values = Sequence[float | str | None]
"""A trace's coordinates: numbers, or category/time strings; None leaves a gap."""


class Font(TypedDict):
    size: int


class Title(TypedDict):
    text: str
    font: NotRequired[Font]


class Axis(TypedDict, total=False):
    title: Title
    type: Literal["log"]
    overlaying: str  # another axis ("y"): drawn over it
    side: Literal["left", "right"]


class Margin(TypedDict):
    l: int  # noqa: E741 - plotly's name (pixels, like the others)
    r: int
    t: int
    b: int


class Legend(TypedDict):
    orientation: Literal["h", "v"]
    y: float


class Grid(TypedDict):
    rows: int
    columns: int
    pattern: Literal["independent", "coupled"]


class Line(TypedDict, total=False):
    dash: Literal["dash", "dot"]
    width: int
    color: str


class Marker(TypedDict):
    size: int


class Trace(TypedDict, total=False):
    """One trace (a bar or scatter series)."""

    type: Literal["bar", "scatter"]
    mode: str  # "lines", "markers+text", ...
    name: str
    x: Values
    y: Values
    text: list[str]
    textposition: str
    cliponaxis: bool
    xaxis: str  # "x", "x2": which axis of a grid
    yaxis: str
    marker: Marker
    line: Line
    connectgaps: bool


class Shape(TypedDict):
    """A line across a plot (here: the source model's metric)."""

    type: Literal["line"]
    xref: str
    x0: float
    x1: float
    yref: str
    y0: float | None
    y1: float | None
    line: Line


class Layout(TypedDict, total=False):
    margin: Margin
    height: int  # pixels
    hovermode: str
    legend: Legend
    paper_bgcolor: str
    title: Title
    xaxis: Axis
    yaxis: Axis
    xaxis2: Axis
    yaxis2: Axis
    grid: Grid
    shapes: list[Shape]


class Figure(TypedDict):
    """A plotly figure: its traces and layout."""

    data: list[Trace]
    layout: Layout


class Config(TypedDict):
    displaylogo: bool
    responsive: bool
    modeBarButtonsToRemove: list[str]


CONFIG: Config = {
    "displaylogo": False,
    "responsive": True,
    "modeBarButtonsToRemove": ["sendDataToCloud"],
}
_LAYOUT: Layout = {
    "margin": {"l": 56, "r": 16, "t": 36, "b": 44},
    "height": 320,
    "hovermode": "x unified",
    "legend": {"orientation": "h", "y": -0.2},
    "paper_bgcolor": "rgba(0,0,0,0)",
}


class _Overrides(TypedDict, total=False):
    """What a chart changes in the common layout."""

    height: int
    margin: Margin
    yaxis2: Axis


def _layout(title: str, x: str, y: str, **extra: Unpack[_Overrides]) -> Layout:
    return {
        **_LAYOUT,
        "title": {"text": title, "font": {"size": 14}},
        "xaxis": {"title": {"text": x}},
        "yaxis": {"title": {"text": y}},
        **extra,
    }


def _series(epochs: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for row in epochs:
        value = row.get(key)
        # NaN or inf would not survive JSON; a diverged epoch is simply not drawn
        if isinstance(value, int | float) and not isinstance(value, bool) and isfinite(value):
            xs.append(row["epoch"])
            ys.append(value)
    return xs, ys


def _line(epochs: Sequence[Mapping[str, float]], key: str) -> Trace:
    xs, ys = _series(epochs, key)
    return {"type": "scatter", "mode": "lines+markers", "name": key, "x": xs, "y": ys}


def loss_curves(epochs: Sequence[Mapping[str, float]]) -> Figure:
    """Training and validation loss per epoch."""
    keys = [k for k in ("train_loss", "val_loss") if any(k in row for row in epochs)]
    keys = keys or ["train_loss"]
    return {
        "data": [_line(epochs, k) for k in keys],
        "layout": _layout("Loss", "epoch", "loss"),
    }


def validation_curves(epochs: Sequence[Mapping[str, float]]) -> Figure:
    """Every other ``val_*`` metric per epoch (accuracy, F1, RMSE, ...)."""
    keys = sorted({k for row in epochs for k in row if k.startswith("val_") and k != "val_loss"})
    return {
        "data": [_line(epochs, k) for k in keys],
        "layout": _layout("Validation metrics", "epoch", "value"),
    }


ParetoCost = Literal["bytes", "p50_ms"]
ParetoFlag = Literal["front_size", "front_latency"]
PARETO_COSTS: tuple[tuple[ParetoCost, ParetoFlag], ...] = (
    ("bytes", "front_size"),
    ("p50_ms", "front_latency"),
)
"""Each cost of the trade-off chart, and the flag of a variant on its Pareto front."""


class ParetoPoint(TypedDict):
    """A compressed variant on the trade-off chart (None: a cost its report lacks)."""

    metric_name: str
    label: str
    bytes: float | None
    p50_ms: float | None
    metric: float  # on the test split
    source_metric: float | None  # the source version's, drawn as a dashed line
    front_size: bool
    front_latency: bool


def pareto(variants: list[ParetoPoint], metric: str, higher_is_better: bool) -> Figure:
    """Compressed variants: size and p50 latency (batch 1) against the test metric; the
    Pareto front is drawn as a line."""
    data: list[Trace] = []
    for axis, (cost, front), title in zip(
        ("", "2"), PARETO_COSTS, ("size", "latency"), strict=True
    ):
        points = [v for v in variants if v[cost] is not None]
        data.append(
            {
                "type": "scatter",
                "mode": "markers+text",
                "name": f"variants ({title})",
                "x": [v[cost] for v in points],
                "y": [v["metric"] for v in points],
                "text": [v["label"] for v in points],
                "textposition": "top center",
                "cliponaxis": False,  # labels of points at the edges stay readable
                "xaxis": f"x{axis}",
                "yaxis": f"y{axis}",
                "marker": {"size": 10},
            }
        )
        on_front = sorted((v for v in points if v[front]), key=lambda v: v[cost] or 0.0)
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": f"Pareto front ({title})",
                "x": [v[cost] for v in on_front],
                "y": [v["metric"] for v in on_front],
                "xaxis": f"x{axis}",
                "yaxis": f"y{axis}",
                "line": {"dash": "dot"},
            }
        )
    sources = [v["source_metric"] for v in variants if v.get("source_metric") is not None]
    shapes: list[Shape] = []
    if sources:
        for axis in ("", "2"):
            shapes.append(
                {
                    "type": "line",
                    "xref": f"x{axis} domain",
                    "x0": 0,
                    "x1": 1,
                    "yref": f"y{axis}",
                    "y0": sources[0],
                    "y1": sources[0],
                    "line": {"dash": "dash", "width": 1, "color": "#888"},
                }
            )
    better = "higher is better" if higher_is_better else "lower is better"
    layout: Layout = {
        **_LAYOUT,
        "height": 360,
        "hovermode": "closest",
        "title": {"text": f"Compression trade-off ({metric}, {better})", "font": {"size": 14}},
        "grid": {"rows": 1, "columns": 2, "pattern": "independent"},
        "xaxis": {"title": {"text": "model size (bytes)"}, "type": "log"},
        "yaxis": {"title": {"text": metric}},
        "xaxis2": {"title": {"text": "p50 latency, batch 1 (ms)"}, "type": "log"},
        "yaxis2": {"title": {"text": metric}},
        "shapes": shapes,
    }
    return {"data": data, "layout": layout}


def traffic(series: Sequence[SeriesPoint]) -> Figure:
    """A deployment's recent traffic: requests/s (bars) and latency p50/p99 (lines, right
    axis), from the serving window's ``series`` (``time`` in epoch seconds)."""
    from datetime import UTC, datetime

    times = [
        datetime.fromtimestamp(float(p["time"]), UTC).strftime("%Y-%m-%d %H:%M:%S") for p in series
    ]

    def values(key: Literal["requests_per_s", "p50_ms", "p99_ms"]) -> list[float | None]:
        return [p.get(key) for p in series]

    return {
        "data": [
            {"type": "bar", "name": "requests/s", "x": times, "y": values("requests_per_s")},
            {
                "type": "scatter",
                "mode": "lines",
                "name": "p50 (ms)",
                "x": times,
                "y": values("p50_ms"),
                "yaxis": "y2",
                "connectgaps": False,
            },
            {
                "type": "scatter",
                "mode": "lines",
                "name": "p99 (ms)",
                "x": times,
                "y": values("p99_ms"),
                "yaxis": "y2",
                "connectgaps": False,
            },
        ],
        "layout": _layout(
            "Traffic, last minutes",
            "time (UTC)",
            "requests/s",
            height=300,
            margin={"l": 56, "r": 64, "t": 36, "b": 44},
            yaxis2={"title": {"text": "latency (ms)"}, "overlaying": "y", "side": "right"},
        ),
    }


USAGE_UNITS = {
    "compute_seconds": "seconds",
    "prediction_requests": "requests",
    "prediction_rows": "rows",
    "stored_bytes": "bytes",
}


def usage(summary: dict[str, Any], days: list[str]) -> list[Figure]:
    """One bar chart per usage kind, by day (``summary``: kiln.monitor.usage.summary)."""
    by_kind: dict[str, dict[str, float]] = {}
    for item in summary["items"]:
        per_day = by_kind.setdefault(item["kind"], {})
        per_day[item["period"]] = per_day.get(item["period"], 0.0) + item["quantity"]
    figures: list[Figure] = []
    for kind in sorted(by_kind):
        per_day = by_kind[kind]
        figures.append(
            {
                "data": [
                    {
                        "type": "bar",
                        "name": kind,
                        "x": days,
                        "y": [per_day.get(d, 0.0) for d in days],
                    }
                ],
                "layout": _layout(
                    kind.replace("_", " "), "day (UTC)", USAGE_UNITS.get(kind, kind), height=260
                ),
            }
        )
    return figures
