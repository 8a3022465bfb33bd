"""Plotly figure specs (plain ``{"data", "layout"}`` dicts) for the dashboard's charts.

Pages embed them as JSON; ``static/kiln.js`` draws them with the plotly.js that the
plotly package ships. Nothing here imports plotly: a figure is just data, typed below
as the subset of plotly's schema these charts use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
    range: list[float]  # [low, high]; on a log axis in powers of ten (log10 of the values)
    rangemode: Literal["tozero", "nonnegative"]  # a count or a time never dips below 0
    tickformat: str  # d3-format; on a log axis it labels every tick in full
    dtick: float  # the step between ticks
    tickmode: Literal["auto", "sync"]  # "sync": an overlaying axis' ticks on the grid below
    showgrid: bool
    autorange: Literal["reversed"]  # a category axis listed top to bottom
    automargin: bool  # room for long tick labels (feature names)


class Margin(TypedDict):
    l: int  # noqa: E741 - plotly's name (pixels, like the others)
    r: int
    t: int
    b: int


class Legend(TypedDict):
    """Where the legend sits: ``y`` in ``yref``'s coordinates ("container": the whole
    figure, so it stays below the axis titles whatever the plot's height)."""

    orientation: Literal["h", "v"]
    x: float
    y: float
    yref: Literal["container", "paper"]
    yanchor: Literal["top", "bottom"]


class Grid(TypedDict):
    rows: int
    columns: int
    pattern: Literal["independent", "coupled"]


class Line(TypedDict, total=False):
    dash: Literal["dash", "dot"]
    width: int
    color: str
    shape: Literal["hv"]  # a staircase: across, then up or down


class Marker(TypedDict):
    size: int


class Trace(TypedDict, total=False):
    """One trace (a bar or scatter series)."""

    type: Literal["bar", "scatter"]
    orientation: Literal["h", "v"]  # "h": bars along x, one per y category
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
    showlegend: bool


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
    showlegend: bool  # plotly hides the legend of a one-trace figure unless told
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
    # the bottom margin holds the x axis' ticks and title, and below them the legend
    "margin": {"l": 64, "r": 16, "t": 36, "b": 84},
    "height": 340,
    "hovermode": "x unified",
    "showlegend": True,
    "legend": {"orientation": "h", "x": 0, "y": 0, "yref": "container", "yanchor": "bottom"},
    "paper_bgcolor": "rgba(0,0,0,0)",
}


class _Overrides(TypedDict, total=False):
    """What a chart changes in the common layout."""

    height: int
    margin: Margin
    yaxis: Axis
    yaxis2: Axis


def _layout(title: str, x: str, y: str, **extra: Unpack[_Overrides]) -> Layout:
    return {
        **_LAYOUT,
        "title": {"text": title, "font": {"size": 14}},
        "xaxis": {"title": {"text": x}},
        "yaxis": {"title": {"text": y}},
        **extra,
    }


def _counted(title: str) -> Axis:
    """A y axis of counts, rates or durations: from 0 up, never a negative tick (plotly
    centres an axis of no data, or of zeros, on 0)."""
    return {"title": {"text": title}, "rangemode": "tozero"}


def _series(
    epochs: Sequence[Mapping[str, float]], key: str, positive: bool = False
) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for row in epochs:
        value = row.get(key)
        # NaN or inf would not survive JSON; a diverged epoch is simply not drawn
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            if positive and value <= 0:
                continue  # a log axis has no place for it
            xs.append(row["epoch"])
            ys.append(value)
    return xs, ys


def _line(
    epochs: Sequence[Mapping[str, float]], key: str, axis: str = "", positive: bool = False
) -> Trace:
    xs, ys = _series(epochs, key, positive)
    trace: Trace = {"type": "scatter", "mode": "lines+markers", "name": key, "x": xs, "y": ys}
    if axis:
        trace |= {"xaxis": f"x{axis}", "yaxis": f"y{axis}"}
    return trace


def _named(keys: Sequence[str], family: str) -> Title:
    """A y axis' title: the metric itself when it is the only one on the axis."""
    return {"text": keys[0] if len(keys) == 1 else family}


WHOLE_EPOCHS = 12
"""Up to this many epochs the epoch axis ticks each one (no "1.5"); beyond, plotly picks."""


def _epoch_axis(epochs: Sequence[Mapping[str, float]]) -> Axis:
    axis: Axis = {"title": {"text": "epoch"}}
    if len(epochs) <= WHOLE_EPOCHS:
        axis["dtick"] = 1
    return axis


def loss_curves(epochs: Sequence[Mapping[str, float]]) -> Figure:
    """Training and validation loss per epoch."""
    keys = [k for k in ("train_loss", "val_loss") if any(k in row for row in epochs)]
    keys = keys or ["train_loss"]
    layout = _layout("Loss", "epoch", "loss")
    layout |= {"xaxis": _epoch_axis(epochs), "yaxis": {"title": _named(keys, "loss")}}
    return {"data": [_line(epochs, k) for k in keys], "layout": layout}


def validation_curves(epochs: Sequence[Mapping[str, float]]) -> Figure:
    """Every other ``val_*`` metric per epoch, in two panels of their own scales: errors
    (MSE, MAE, RMSE: unbounded, on a log axis, so 2e10 and 1e5 both read) and scores
    (accuracy, F1, R²: higher is better, about 0 to 1). One panel when one family is there."""
    from kiln.spec.spec import metric_mode

    keys = sorted({k for row in epochs for k in row if k.startswith("val_") and k != "val_loss"})
    errors = [k for k in keys if metric_mode(k) == "min"]
    scores = [k for k in keys if metric_mode(k) == "max"]
    layout = _layout("Validation metrics", "epoch", "value")
    layout["xaxis"] = _epoch_axis(epochs)
    if errors and scores:
        data = [_line(epochs, k, "", positive=True) for k in errors]
        data += [_line(epochs, k, "2") for k in scores]
        layout |= {
            "grid": {"rows": 1, "columns": 2, "pattern": "independent"},
            "yaxis": {"title": _named(errors, "error (log scale)"), "type": "log"},
            "xaxis2": _epoch_axis(epochs),
            "yaxis2": {"title": _named(scores, "score")},
        }
        return {"data": data, "layout": layout}
    if errors:
        layout["yaxis"] = {"title": _named(errors, "error (log scale)"), "type": "log"}
        return {"data": [_line(epochs, k, positive=True) for k in errors], "layout": layout}
    layout["yaxis"] = {"title": _named(scores or ["value"], "score")}
    return {"data": [_line(epochs, k) for k in scores], "layout": layout}


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


SIZE_UNITS = (("B", 1.0), ("KiB", 1024.0), ("MiB", 1024.0**2), ("GiB", 1024.0**3))
"""Binary size units, as the dashboard's tables write sizes (the ``size`` filter)."""


def size_unit(largest: float) -> tuple[str, float]:
    """The unit the tables would write ``largest`` bytes in, and its bytes."""
    unit = SIZE_UNITS[0]
    for candidate in SIZE_UNITS:
        if abs(largest) >= candidate[1]:
            unit = candidate
    return unit


def _padded(values: Sequence[float], log: bool, share: float = 0.12) -> list[float]:
    """An axis range around ``values`` with room on both sides, so no point (or its label)
    sits on the frame; a log axis' range is in powers of ten, as plotly wants it."""
    low, high = min(values), max(values)
    if log:
        low, high = math.log10(low), math.log10(high)
    span = high - low
    pad = span * share if span > 0 else (0.15 if log else max(abs(high) * 0.05, 0.01))
    return [low - pad, high + pad]


def _front_line(
    points: Sequence[tuple[float, float]], front: Sequence[tuple[float, float]]
) -> tuple[list[float], list[float]]:
    """The Pareto front as a staircase through its points (sorted by cost), carried on
    to the costliest variant: what lies right of it and below (or above, for a
    lower-is-better metric) is dominated. Two points or more, unless only one variant."""
    steps = sorted(front)
    if not steps:
        return [], []
    xs, ys = [c for c, _ in steps], [m for _, m in steps]
    costliest = max(c for c, _ in points)
    if costliest > xs[-1] or len(xs) == 1:
        xs.append(costliest)
        ys.append(ys[-1])
    return xs, ys


def pareto(variants: list[ParetoPoint], metric: str, higher_is_better: bool) -> Figure:
    """Compressed variants: size (in the tables' unit) and p50 latency (batch 1) against
    the test metric, each axis padded around its points; the Pareto front is a dotted
    staircase, the source version's metric a dashed line."""
    sizes = [v["bytes"] for v in variants if v["bytes"] is not None]
    unit, per = size_unit(max(sizes, default=0.0))
    scale = {"bytes": per, "p50_ms": 1.0}
    data: list[Trace] = []
    ranges: list[list[float]] = []
    for axis, (cost, front), title in zip(
        ("", "2"), PARETO_COSTS, ("size", "latency"), strict=True
    ):
        traces, span = _pareto_panel(variants, cost, front, title, axis, scale[cost])
        data += traces
        ranges.append(span)
    sources = [v["source_metric"] for v in variants if v.get("source_metric") is not None]
    shapes = _source_lines(sources[0]) if sources else []
    metrics = [v["metric"] for v in variants] + [s for s in sources[:1] if s is not None]
    y_range = _padded(metrics, log=False, share=0.2) if metrics else []
    better = "higher is better" if higher_is_better else "lower is better"
    layout: Layout = {
        **_LAYOUT,
        "height": 380,
        "hovermode": "closest",
        "title": {"text": f"Compression trade-off ({metric}, {better})", "font": {"size": 14}},
        "grid": {"rows": 1, "columns": 2, "pattern": "independent"},
        "xaxis": _log_axis(f"model size ({unit})", ranges[0]),
        "yaxis": _value_axis(metric, y_range),
        "xaxis2": _log_axis("p50 latency, batch 1 (ms)", ranges[1]),
        "yaxis2": _value_axis(metric, y_range),
        "shapes": shapes,
    }
    return {"data": data, "layout": layout}


def _pareto_panel(
    variants: list[ParetoPoint],
    cost: ParetoCost,
    front: ParetoFlag,
    title: str,
    axis: str,
    unit: float,
) -> tuple[list[Trace], list[float]]:
    """One panel of the trade-off chart (``cost`` in ``unit``s on a log x axis): the
    variants, the front's staircase, and the x range padded around the points."""
    points = [v for v in variants if (v[cost] or 0.0) > 0]  # a log axis: positive costs
    xy = [((v[cost] or 0.0) / unit, v["metric"]) for v in points]
    xs, ys = _front_line(xy, [p for p, v in zip(xy, points, strict=True) if v[front]])
    variants_trace: Trace = {
        "type": "scatter",
        "mode": "markers+text",
        "name": f"variants ({title})",
        "x": [x for x, _ in xy],
        "y": [y for _, y in xy],
        "text": [v["label"] for v in points],
        "textposition": "top center",
        "cliponaxis": False,  # labels of points at the edges stay readable
        "xaxis": f"x{axis}",
        "yaxis": f"y{axis}",
        "marker": {"size": 10},
    }
    front_trace: Trace = {
        "type": "scatter",
        "mode": "lines",
        "name": f"Pareto front ({title})",
        "x": xs,
        "y": ys,
        "xaxis": f"x{axis}",
        "yaxis": f"y{axis}",
        "line": {"dash": "dot", "shape": "hv", "width": 2},
        # a line of no length draws nothing: then nothing in the legend either
        "showlegend": len(set(zip(xs, ys, strict=True))) >= 2,
    }
    span = _padded([x for x, _ in xy], log=True) if xy else []
    return [variants_trace, front_trace], span


def _source_lines(metric: float | None) -> list[Shape]:
    """The source version's metric: a dashed line across each panel."""
    return [
        {
            "type": "line",
            "xref": f"x{axis} domain",
            "x0": 0,
            "x1": 1,
            "yref": f"y{axis}",
            "y0": metric,
            "y1": metric,
            "line": {"dash": "dash", "width": 1, "color": "#888"},
        }
        for axis in ("", "2")
    ]


def _log_axis(title: str, span: list[float]) -> Axis:
    """A log axis labelled in plain numbers at every tick (plotly's default writes only
    the leading digit of most ticks: "8 9 0.01 2 3")."""
    axis: Axis = {"title": {"text": title}, "type": "log", "tickformat": "~g"}
    if span:
        axis["range"] = span
    return axis


def _value_axis(title: str, span: list[float]) -> Axis:
    axis: Axis = {"title": {"text": title}}
    if span:
        axis["range"] = span
    return axis


IMPORTANCE_TOP = 20
"""Features drawn in the importance chart (the largest gains)."""


def importance(gains: Sequence[tuple[str, float]]) -> Figure:
    """A tree model's feature importances: one horizontal bar per feature (total split
    gain), the largest ``IMPORTANCE_TOP`` first, from the top down."""
    top = sorted(((name, g) for name, g in gains if math.isfinite(g)), key=lambda kv: -kv[1])[
        :IMPORTANCE_TOP
    ]
    trace: Trace = {
        "type": "bar",
        "orientation": "h",
        "name": "total gain",
        "x": [g for _, g in top],
        "y": [name for name, _ in top],
        "showlegend": False,
    }
    layout = _layout("Feature importance", "total gain", "feature")
    layout |= {
        "height": max(240, 60 + 22 * len(top)),
        "hovermode": "closest",
        "showlegend": False,
        "xaxis": {"title": {"text": "total gain"}, "rangemode": "tozero"},
        "yaxis": {"title": {"text": "feature"}, "autorange": "reversed", "automargin": True},
    }
    return {"data": [trace], "layout": layout}


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
                "mode": "lines+markers",  # a lone point (one busy interval) still shows
                "name": "p50 (ms)",
                "x": times,
                "y": values("p50_ms"),
                "yaxis": "y2",
                "connectgaps": False,
            },
            {
                "type": "scatter",
                "mode": "lines+markers",  # a lone point (one busy interval) still shows
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
            margin={"l": 64, "r": 64, "t": 36, "b": 84},
            yaxis=_counted("requests/s"),
            yaxis2=_counted("latency (ms)")
            | {"overlaying": "y", "side": "right", "tickmode": "auto", "showgrid": False},
        ),
    }


USAGE_UNITS = {
    "compute_seconds": "seconds",
    "worker_seconds": "worker-seconds",
    "prediction_requests": "requests",
    "prediction_rows": "rows",
    "prompt_tokens": "tokens",
    "completion_tokens": "tokens",
    "stored_bytes": "bytes",
}
TOKEN_KINDS = ("prompt_tokens", "completion_tokens")


def tokens_by_deployment(summary: dict[str, Any], days: list[str]) -> Figure | None:
    """Prompt + completion tokens per day, one bar per deployment (``summary``:
    kiln.monitor.usage.summary split ``by`` deployment); None without token usage."""
    per_deployment: dict[str, dict[str, float]] = {}
    for item in summary["items"]:
        if item["kind"] in TOKEN_KINDS:
            per_day = per_deployment.setdefault(item["deployment"], {})
            per_day[item["period"]] = per_day.get(item["period"], 0.0) + item["quantity"]
    if not per_deployment:
        return None
    return {
        "data": [
            {
                "type": "bar",
                "name": name or "(none)",
                "x": days,
                "y": [per_deployment[name].get(d, 0.0) for d in days],
            }
            for name in sorted(per_deployment)
        ],
        "layout": _layout(
            "tokens by deployment", "day (UTC)", "tokens", height=300, yaxis=_counted("tokens")
        ),
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
                    kind.replace("_", " "),
                    "day (UTC)",
                    USAGE_UNITS.get(kind, kind),
                    height=280,
                    yaxis=_counted(USAGE_UNITS.get(kind, kind)),
                ),
            }
        )
    return figures
