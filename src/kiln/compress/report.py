"""The trade-off view: a table of every variant and the Pareto front, plus a plot.

A variant is on the Pareto front (for size, or for latency) when no other variant is
at least as small (fast) and at least as good on the metric, and strictly better in one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, JsonValue
from typing_extensions import TypedDict  # pydantic validates these on Python 3.11

from kiln.manifest import JSONDocument, StepRecord
from kiln.spec.spec import metric_mode

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.backend_bases import RendererBase
    from matplotlib.figure import Figure
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox


class Latency(TypedDict):
    """What ``kiln.compress.measure.latency`` measured, in milliseconds and rows per second."""

    threads: int
    runs: int
    batch1_p50_ms: float
    batch1_p95_ms: float
    batch32_p50_ms: float
    batch32_p95_ms: float
    throughput_rows_per_s: float


class Machine(TypedDict):
    """What the figures were measured on (``kiln.compress.measure.machine``)."""

    cpu: str
    cpu_flags: list[str]  # the SIMD flags that matter to inference
    cores: int | None
    python: str
    versions: dict[str, str]  # torch, onnxruntime, numpy, modelkiln: those installed
    cuda: str | None  # the CUDA device's name


class Interval(BaseModel):
    """A two-sided confidence interval (``kiln.compress.confidence`` computes them)."""

    low: float
    high: float
    confidence: float = 0.95
    method: str  # "wilson" (accuracy) or "bootstrap" (other metrics, and drops)


class HeldOutReport(BaseModel):
    """The tolerance metric on the rows it was checked on (validation + test), with 95%
    intervals of the value and of the drop versus the source on the same rows."""

    rows: int
    value: float
    source_value: float
    interval: Interval
    drop_interval: Interval


class MetricReport(BaseModel):
    """The tolerance metric of a variant against the source's (drop: positive = worse).

    ``drop`` is the one the tolerance checked: on the held-out rows (``held_out``).
    """

    name: str
    test: float
    source_test: float
    val: float
    source_val: float
    drop: float
    relative_drop: float | None  # drop / |source held-out value|; None when that is 0
    held_out: HeldOutReport | None = None  # None in reports written before it was added


class VariantReport(BaseModel):
    """``compression.json``: one variant (or the source) measured on this machine."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    step: StepRecord | None
    # one per try of the step: attempt, val_<metric>, drop, and amount / excluded
    attempts: list[JSONDocument]
    backend: str
    quantization: str | None
    excluded_layers: list[str]
    model_bytes: int  # the weights (or the ONNX graph) in memory
    disk_bytes: int | None
    parameters: int
    nonzeros: int
    sparsity: float
    latency: Latency
    peak_memory_bytes: int | None
    metric: MetricReport
    agreement_with_parent: float
    machine: Machine


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[bool]:
    """For (cost, metric) points: whether each is not dominated by another."""
    front = []
    for i, (cost, value) in enumerate(points):
        dominated = False
        for j, (c2, v2) in enumerate(points):
            if i == j:
                continue
            better_v = v2 >= value if higher_is_better else v2 <= value
            strictly = c2 < cost or (v2 > value if higher_is_better else v2 < value)
            if c2 <= cost and better_v and strictly:
                dominated = True
                break
        front.append(not dominated)
    return front


def rows(reports: list[JSONDocument], names: list[str]) -> list[JSONDocument]:
    """One flat row per variant (``reports`` as compression.json holds them, named
    by ``names``) with Pareto flags for size and latency."""
    parsed = [VariantReport.model_validate(r) for r in reports]
    metric = parsed[0].metric.name
    higher = metric_mode(metric) == "max"
    sizes = [(float(r.model_bytes), r.metric.test) for r in parsed]
    lat = [(r.latency["batch1_p50_ms"], r.metric.test) for r in parsed]
    size_front = pareto_front(sizes, higher)
    lat_front = pareto_front(lat, higher)
    return [
        _row(name, r, higher, size_front[i], lat_front[i])
        for i, (name, r) in enumerate(zip(names, parsed, strict=True))
    ]


def _row(
    name: str, r: VariantReport, higher: bool, pareto_size: bool, pareto_latency: bool
) -> JSONDocument:
    """One variant's row; the tolerance metric's test value is under its own name."""
    m = r.metric
    held = m.held_out
    return {
        "variant": name,
        "backend": r.backend + (f" {r.quantization}" if r.quantization else ""),
        "parameters": r.parameters,
        "nonzeros": r.nonzeros,
        "model_bytes": r.model_bytes,
        "p50_ms_b1": r.latency["batch1_p50_ms"],
        "p95_ms_b1": r.latency["batch1_p95_ms"],
        "p50_ms_b32": r.latency["batch32_p50_ms"],
        "rows_per_s": r.latency["throughput_rows_per_s"],
        "peak_mb": (r.peak_memory_bytes or 0) / 2**20 or None,
        m.name: m.test,
        "drop": m.test - m.source_test if not higher else m.source_test - m.test,
        "agreement": r.agreement_with_parent,
        "held_out_rows": held.rows if held else None,
        "held_out": held.value if held else None,
        "held_out_low": held.interval.low if held else None,
        "held_out_high": held.interval.high if held else None,
        "held_out_drop": m.drop,
        "drop_low": held.drop_interval.low if held else None,
        "drop_high": held.drop_interval.high if held else None,
        "pareto_size": pareto_size,
        "pareto_latency": pareto_latency,
    }


def plot(table: list[JSONDocument], metric: str, path: Path) -> Path:
    """Size and latency against the metric, Pareto fronts drawn, saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(table, metric)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure(table: list[JSONDocument], metric: str) -> Figure:
    """The figure :func:`plot` saves (Agg): one panel for size, one for latency, each
    point labelled with its variant's name, no two labels overlapping."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        ("model_bytes", "pareto_size", "model size (KiB)", 1 / 1024),
        ("p50_ms_b1", "pareto_latency", "latency p50 at batch 1 (ms)", 1.0),
    )
    placements = []
    for ax, (key, front_key, label, scale) in zip(axes, panels, strict=True):
        xs = [_number(r[key]) * scale for r in table]
        ys = [_number(r[metric]) for r in table]
        colours = ["tab:red" if r[front_key] else "tab:gray" for r in table]
        ax.scatter(xs, ys, c=colours, zorder=3)
        front = sorted((x, y) for r, x, y in zip(table, xs, ys, strict=True) if r[front_key])
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), color="tab:red", linestyle="--", zorder=2)
        ax.margins(0.18)  # room for the labels inside the axes
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
        placements.append((ax, [str(r["variant"]) for r in table], xs, ys))
    fig.suptitle("compression trade-offs (red: Pareto front)")
    fig.tight_layout()  # before placing labels: placement works in final display space
    for ax, names, xs, ys in placements:
        _place_labels(ax, names, xs, ys)
    return fig


# Label offsets from the point, in points, tried in order: near first, then further out.
_OFFSETS = [
    (r * dx, r * dy)
    for r in (6, 14, 24, 36, 50)
    for dx, dy in ((1, 0.7), (1, -0.7), (-1, 0.7), (-1, -0.7), (0, 1), (0, -1), (1, 0), (-1, 0))
]


def _place_labels(ax: Axes, names: list[str], xs: list[float], ys: list[float]) -> None:
    """Annotate each point with its name at the first offset of :data:`_OFFSETS` whose
    text box overlaps no label placed before and no point, and stays inside the axes
    (deterministic: the same table gives the same picture)."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()  # type: ignore[attr-defined]
    points = ax.transData.transform(list(zip(xs, ys, strict=True)))
    taken = [Bbox.from_extents(px - 4, py - 4, px + 4, py + 4) for px, py in points]
    for name, x, y in zip(names, xs, ys, strict=True):
        taken.append(_first_free(ax, name, (x, y), taken, renderer))


def _first_free(
    ax: Axes, name: str, xy: tuple[float, float], taken: list[Bbox], renderer: RendererBase
) -> Bbox:
    """Place ``name``'s label at the first free offset (nowhere free: the first offset);
    returns its box in display space."""
    inside = ax.get_window_extent(renderer)
    for offset in _OFFSETS:
        label = _annotate(ax, name, xy, offset)
        box = label.get_window_extent(renderer)
        within = inside.x0 <= box.x0 and box.x1 <= inside.x1
        within = within and inside.y0 <= box.y0 and box.y1 <= inside.y1
        if within and not any(box.overlaps(other) for other in taken):
            return box
        label.remove()
    return _annotate(ax, name, xy, _OFFSETS[0]).get_window_extent(renderer)


def _annotate(ax: Axes, name: str, xy: tuple[float, float], offset: tuple[float, float]) -> Text:
    """A label ``offset`` points from ``xy``, anchored on the side facing the point."""
    dx, dy = offset
    return ax.annotate(
        name,
        xy,
        textcoords="offset points",
        xytext=offset,
        fontsize=8,
        ha="left" if dx > 0 else "right" if dx < 0 else "center",
        va="bottom" if dy > 0 else "top" if dy < 0 else "center",
    )


def _number(value: JsonValue) -> float:
    """A figure of a :func:`rows` row (the table holds numbers under these keys)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)
