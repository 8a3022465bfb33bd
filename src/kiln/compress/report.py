"""The trade-off view: a table of every variant and the Pareto front, plus a plot.

A variant is on the Pareto front (for size, or for latency) when no other variant is
at least as small (fast) and at least as good on the metric, and strictly better in one.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, JsonValue
from typing_extensions import TypedDict  # pydantic validates these on Python 3.11

from kiln.manifest import JSONDocument, StepRecord
from kiln.spec.spec import metric_mode


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


class MetricReport(BaseModel):
    """The tolerance metric of a variant against the source's (drop: positive = worse)."""

    name: str
    test: float
    source_test: float
    val: float
    source_val: float
    drop: float
    relative_drop: float | None  # drop / |source_val|; None when source_val is 0


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
        "pareto_size": pareto_size,
        "pareto_latency": pareto_latency,
    }


def plot(table: list[JSONDocument], metric: str, path: Path) -> Path:
    """Size and latency against the metric, Pareto fronts drawn, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        ("model_bytes", "pareto_size", "model size (KiB)", 1 / 1024),
        ("p50_ms_b1", "pareto_latency", "latency p50 at batch 1 (ms)", 1.0),
    )
    for ax, (key, front_key, label, scale) in zip(axes, panels, strict=True):
        xs = [_number(r[key]) * scale for r in table]
        ys = [_number(r[metric]) for r in table]
        colours = ["tab:red" if r[front_key] else "tab:gray" for r in table]
        ax.scatter(xs, ys, c=colours, zorder=3)
        for r, x, y in zip(table, xs, ys, strict=True):
            ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = sorted((x, y) for r, x, y in zip(table, xs, ys, strict=True) if r[front_key])
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), color="tab:red", linestyle="--", zorder=2)
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
    fig.suptitle("compression trade-offs (red: Pareto front)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _number(value: JsonValue) -> float:
    """A figure of a :func:`rows` row (the table holds numbers under these keys)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)
