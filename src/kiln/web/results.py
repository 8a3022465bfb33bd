"""A job's outcome as the dashboard shows it: metric tables, confusion-matrix heat maps,
the versions it registered, its measured resources and its progress.

Everything here is plain data for the templates (no HTML): ``Job.result`` is JSON whose
keys depend on the kind (:mod:`kiln.jobs.results`), so each reader takes what it
recognises and leaves the rest to be shown as JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from kiln.monitor.units import binary_size, duration

if TYPE_CHECKING:
    from kiln.jobs.placement import ExecutorRecord

CONFUSION = "confusion_matrix"


@dataclass(frozen=True)
class MetricTable:
    """Scalar metrics as rows, one column per split (``test``, ``val``) or statistic."""

    title: str
    columns: list[str]
    rows: list[tuple[str, list[Any]]]  # (metric, one value per column; None: absent)


@dataclass(frozen=True)
class HeatCell:
    count: int
    share: float  # of the row's total, 0..1: the colour's strength
    diagonal: bool  # a correct prediction


@dataclass(frozen=True)
class Heatmap:
    """A confusion matrix: rows are the true class, columns the predicted one."""

    title: str
    labels: list[str]
    rows: list[list[HeatCell]]


@dataclass(frozen=True)
class VersionLink:
    model: str
    version: int
    variant: str | None = None  # a compressed variant's name


@dataclass
class ResultView:
    """What the job page shows of ``Job.result``; ``rest``: keys it has no view for."""

    tables: list[MetricTable] = field(default_factory=list)
    heatmaps: list[Heatmap] = field(default_factory=list)
    versions: list[VersionLink] = field(default_factory=list)
    rest: dict[str, Any] = field(default_factory=dict)


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metric_table(title: str, columns: Mapping[str, Any]) -> MetricTable | None:
    """The scalar metrics of each column's metric set, in first-seen order; None when
    no column holds a scalar."""
    sets = {name: values for name, values in columns.items() if isinstance(values, dict)}
    keys: list[str] = []
    for values in sets.values():
        keys += [k for k, v in values.items() if _scalar(v) and k not in keys]
    if not keys:
        return None
    rows = [(k, [v.get(k) if _scalar(v.get(k)) else None for v in sets.values()]) for k in keys]
    return MetricTable(title, list(sets), rows)


def heatmap(title: str, matrix: Any) -> Heatmap | None:
    """A square matrix of counts as a heat map (class indexes as labels), else None."""
    if not isinstance(matrix, list) or not matrix:
        return None
    n = len(matrix)
    if not all(isinstance(r, list) and len(r) == n and all(map(_scalar, r)) for r in matrix):
        return None
    rows = []
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        rows.append([HeatCell(int(c), float(c) / total, i == j) for j, c in enumerate(row)])
    return Heatmap(title, [str(i) for i in range(n)], rows)


def _metric_sets(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A train job's metrics per split, or an evaluate job's one set (as ``value``)."""
    metrics = result.get("metrics")
    if not isinstance(metrics, dict):
        return {}
    splits = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    return splits or {"value": metrics}


def result_view(kind: str, result: Mapping[str, Any]) -> ResultView:
    """The tables, heat maps and version links of a job's result, by what it holds."""
    view = ResultView()
    used: set[str] = set()
    if kind == "crossval" and ("mean" in result or "std" in result):
        columns = {"mean": result.get("mean", {}), "std": result.get("std", {})}
        table = metric_table(f"{result.get('k', '?')}-fold cross-validation", columns)
        view.tables += [table] if table else []
        folds = result.get("folds")
        if isinstance(folds, list):
            per_fold = metric_table("folds", {f"fold {i + 1}": f for i, f in enumerate(folds)})
            view.tables += [per_fold] if per_fold else []
        used |= {"mean", "std", "folds", "k"}
    sets = _metric_sets(result)
    if sets:
        table = metric_table("metrics", sets)
        view.tables += [table] if table else []
        for split, values in sets.items():
            title = f"confusion matrix ({split})" if split != "value" else "confusion matrix"
            found = heatmap(title, values.get(CONFUSION))
            view.heatmaps += [found] if found else []
        used.add("metrics")
    model = result.get("model")
    if isinstance(model, str):
        view.versions = versions_of(result)
        used |= {"model", "version", "variants", "source_version"}
    view.rest = {k: v for k, v in result.items() if k not in used}
    return view


def versions_of(result: Mapping[str, Any]) -> list[VersionLink]:
    """The versions a job registered: a train job's one, a compress job's variants."""
    model = result.get("model")
    if not isinstance(model, str):
        return []
    variants = result.get("variants")
    if isinstance(variants, list):
        return [
            VersionLink(model, v["version"], str(v.get("variant") or ""))
            for v in variants
            if isinstance(v, dict) and isinstance(v.get("version"), int)
        ]
    version = result.get("version")
    return [VersionLink(model, version)] if isinstance(version, int) else []


def resource_facts(resources: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``Job.resources`` as (label, text) rows: wall and CPU time, peak memory (and GPU
    memory where measured), the device, and how many attempts the totals add up."""
    facts: list[tuple[str, str]] = []
    for key, label, show in (
        ("wall_seconds", "wall time", duration),
        ("cpu_seconds", "CPU time", duration),
        ("peak_rss_bytes", "peak memory", binary_size),
        ("gpu_peak_bytes", "GPU peak memory", binary_size),
    ):
        value = resources.get(key)
        if _scalar(value):
            facts.append((label, show(value)))
    if isinstance(resources.get("device"), str):
        facts.append(("device", resources["device"]))
    attempts = resources.get("attempts")
    if isinstance(attempts, list) and len(attempts) > 1:
        facts.append(("attempts measured", str(len(attempts))))
    return facts + executor_facts(resources)


def executor_facts(resources: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Where the job trained when that was on Ray (``kiln.jobs.placement``): the latest
    attempt's cluster, Ray job and workers, their worker time, and where an earlier
    attempt ran when that differed (a job resumed after a lost node). Empty otherwise.
    The job page lists the latest attempt's workers below these facts."""
    latest = ray_text(resources.get("executor"))
    if latest is None:
        return []
    facts = [("ran on", latest)]
    seconds = resources["executor"].get("worker_seconds")
    if _scalar(seconds):
        facts.append(("worker time", duration(seconds)))
    attempts = resources.get("attempts")
    for entry in attempts[:-1] if isinstance(attempts, list) else []:
        earlier = ray_text(entry.get("executor")) if isinstance(entry, dict) else None
        if earlier is not None and earlier != latest:
            facts.append((f"attempt {entry.get('attempt', '?')} ran on", earlier))
    return facts


def ray_text(record: object) -> str | None:
    """``Ray ray://head:10001, Ray job 02000000, 4 workers on 2 nodes``; None for
    anything that is not an executor record."""
    if not isinstance(record, dict) or not isinstance(record.get("workers"), list):
        return None
    from kiln.jobs.placement import node_count

    workers = [w for w in record["workers"] if isinstance(w, dict) and "node_id" in w]
    nodes = node_count(cast("ExecutorRecord", {**record, "workers": workers}))
    return (
        f"Ray {record.get('address', '?')}, Ray job {record.get('ray_job_id', '?')}, "
        f"{_plural(len(workers), 'worker')} on {_plural(nodes, 'node')}"
    )


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass(frozen=True)
class ProgressBar:
    """The job page's progress bar: ``value`` of ``max``, and the text beside it."""

    value: int
    max: int
    text: str


def _whole(value: object) -> int:
    """A count from JSON; 0 for anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return int(value)


def progress_bar(state: str, progress: Mapping[str, object]) -> ProgressBar:
    """Epochs (or folds) done; a job that succeeded before its last epoch stopped early,
    and its bar is full."""
    for done_key, total_key, noun in (("fold", "folds", "fold"), ("epoch", "epochs", "epoch")):
        total = _whole(progress.get(total_key))
        if total > 0:
            done = _whole(progress.get(done_key))
            if state == "succeeded" and done < total:
                return ProgressBar(total, total, f"stopped early at {done}/{total} {noun}s")
            return ProgressBar(done, total, f"{noun} {done} of {total}")
    full = 1 if state == "succeeded" else 0
    return ProgressBar(full, 1, "")
