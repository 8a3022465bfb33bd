"""Plotly figure specs (plain ``{"data", "layout"}`` dicts) for the dashboard's charts.

Pages embed them as JSON; ``static/kiln.js`` draws them with the plotly.js that the
plotly package ships. Nothing here imports plotly: a figure is just data.
"""

from __future__ import annotations

from math import isfinite
from typing import Any

Figure = dict[str, Any]

CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["sendDataToCloud"]}
_LAYOUT = {
    "margin": {"l": 56, "r": 16, "t": 36, "b": 44},
    "height": 320,
    "hovermode": "x unified",
    "legend": {"orientation": "h", "y": -0.2},
    "paper_bgcolor": "rgba(0,0,0,0)",
}


def _layout(title: str, x: str, y: str, **extra: Any) -> dict[str, Any]:
    return {
        **_LAYOUT,
        "title": {"text": title, "font": {"size": 14}},
        "xaxis": {"title": {"text": x}},
        "yaxis": {"title": {"text": y}},
        **extra,
    }


def _series(epochs: list[dict[str, Any]], key: str) -> tuple[list[Any], list[Any]]:
    xs, ys = [], []
    for row in epochs:
        value = row.get(key)
        # NaN or inf would not survive JSON; a diverged epoch is simply not drawn
        if isinstance(value, int | float) and not isinstance(value, bool) and isfinite(value):
            xs.append(row["epoch"])
            ys.append(value)
    return xs, ys


def _line(epochs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    xs, ys = _series(epochs, key)
    return {"type": "scatter", "mode": "lines+markers", "name": key, "x": xs, "y": ys}


def loss_curves(epochs: list[dict[str, Any]]) -> Figure:
    """Training and validation loss per epoch."""
    keys = [k for k in ("train_loss", "val_loss") if any(k in row for row in epochs)]
    keys = keys or ["train_loss"]
    return {
        "data": [_line(epochs, k) for k in keys],
        "layout": _layout("Loss", "epoch", "loss"),
    }


def validation_curves(epochs: list[dict[str, Any]]) -> Figure:
    """Every other ``val_*`` metric per epoch (accuracy, F1, RMSE, ...)."""
    keys = sorted({k for row in epochs for k in row if k.startswith("val_") and k != "val_loss"})
    return {
        "data": [_line(epochs, k) for k in keys],
        "layout": _layout("Validation metrics", "epoch", "value"),
    }


def pareto(variants: list[dict[str, Any]], metric: str, higher_is_better: bool) -> Figure:
    """Compressed variants: size and p50 latency (batch 1) against the test metric.

    ``variants``: ``{"label", "bytes", "p50_ms", "metric", "source_metric",
    "front_size", "front_latency"}`` each; the Pareto front is drawn as a line.
    """
    data: list[dict[str, Any]] = []
    for axis, cost, front, title in (
        ("", "bytes", "front_size", "size"),
        ("2", "p50_ms", "front_latency", "latency"),
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
        on_front = sorted((v for v in points if v[front]), key=lambda v: v[cost])
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
    shapes = []
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
    layout = {
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


def traffic(series: list[dict[str, Any]]) -> Figure:
    """A deployment's recent traffic: requests/s (bars) and latency p50/p99 (lines, right
    axis), from the serving window's ``series`` (``time`` in epoch seconds)."""
    from datetime import UTC, datetime

    times = [
        datetime.fromtimestamp(float(p["time"]), UTC).strftime("%Y-%m-%d %H:%M:%S") for p in series
    ]

    def values(key: str) -> list[Any]:
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
    figures = []
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
