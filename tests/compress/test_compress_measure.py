"""Measurements and the trade-off view: latency, peak memory, machine facts, the Pareto
front, the flat table and the plot. Figures are checked for shape, never for speed."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.compress import measure
from kiln.compress.report import figure, pareto_front, plot, rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LATENCY_KEYS = (
    "batch1_p50_ms",
    "batch1_p95_ms",
    "batch32_p50_ms",
    "batch32_p95_ms",
    "throughput_rows_per_s",
)


# ---- Pareto front on hand-made points --------------------------------------------------


def test_pareto_front_excludes_dominated_points_higher_is_better():
    points = [
        (10.0, 0.90),  # front: cheapest
        (20.0, 0.95),  # front
        (30.0, 0.94),  # dominated by (20, 0.95): dearer and worse
        (40.0, 0.99),  # front: best
        (20.0, 0.93),  # dominated by (20, 0.95): same cost, worse
    ]
    assert pareto_front(points, higher_is_better=True) == [True, True, False, True, False]


def test_pareto_front_lower_is_better_and_ties():
    points = [(1.0, 5.0), (2.0, 4.0), (3.0, 4.5), (1.0, 5.0)]  # e.g. rmse
    # (3, 4.5) is dearer and worse than (2, 4); equal points do not dominate each other.
    assert pareto_front(points, higher_is_better=False) == [True, True, False, True]


def test_pareto_front_of_one_point():
    assert pareto_front([(3.0, 0.1)], higher_is_better=True) == [True]


def _report(model_bytes, p50, test, source_test=0.9, quantization=None):
    """A compression.json report as the pipeline writes it (VariantReport as JSON)."""
    return {
        "name": "variant",
        "step": None,
        "attempts": [],
        "backend": "onnxruntime" if quantization else "torch",
        "quantization": quantization,
        "excluded_layers": [],
        "model_bytes": model_bytes,
        "disk_bytes": None,
        "parameters": 100,
        "nonzeros": 80,
        "sparsity": 0.2,
        "latency": {
            "threads": 1,
            "runs": 30,
            "batch1_p50_ms": p50,
            "batch1_p95_ms": p50 * 2,
            "batch32_p50_ms": p50 * 4,
            "batch32_p95_ms": p50 * 8,
            "throughput_rows_per_s": 32 / (p50 * 4 / 1e3),
        },
        "peak_memory_bytes": 3 * 2**20,
        "metric": {
            "name": "accuracy",
            "test": test,
            "source_test": source_test,
            "val": test,
            "source_val": source_test,
            "drop": source_test - test,
            "relative_drop": (source_test - test) / source_test,
        },
        "agreement_with_parent": 0.97,
        "machine": {
            "cpu": "cpu",
            "cpu_flags": [],
            "cores": 1,
            "python": "3.11.7",
            "versions": {},
            "cuda": None,
        },
    }


def test_rows_flag_the_fronts_and_compute_drops():
    reports = [
        _report(1000, 1.0, 0.90),  # source
        _report(400, 0.5, 0.88),  # smaller and faster: on both fronts
        _report(500, 2.0, 0.80, quantization="int8_dynamic"),  # dominated on both
    ]
    table = rows(reports, ["source", "01-distill", "02-quantize"])
    assert [r["variant"] for r in table] == ["source", "01-distill", "02-quantize"]
    assert [r["pareto_size"] for r in table] == [True, True, False]
    assert [r["pareto_latency"] for r in table] == [True, True, False]
    assert table[1]["drop"] == pytest.approx(0.02)
    assert table[2]["backend"] == "onnxruntime int8_dynamic"
    assert table[0]["backend"] == "torch"
    assert table[0]["peak_mb"] == pytest.approx(3.0)
    assert table[1]["accuracy"] == 0.88


def test_plot_writes_a_png(tmp_path):
    reports = [_report(1000, 1.0, 0.9), _report(400, 0.5, 0.88), _report(300, 0.7, 0.85)]
    table = rows(reports, ["source", "a", "b"])
    path = plot(table, "accuracy", tmp_path / "pareto.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


# ---- measurements of a real bundle -------------------------------------------------


def test_latency_reports_percentiles_at_batch_1_and_32(iris_mlp):
    bundle = kiln.load(str(iris_mlp))
    sample = bundle.preprocessor.transform(bundle.read("sklearn:iris").iloc[:8])
    figures = measure.latency(bundle, sample, runs=30, threads=1)
    for key in LATENCY_KEYS:
        assert figures[key] > 0, key
    assert figures["batch1_p95_ms"] >= figures["batch1_p50_ms"]
    assert figures["batch32_p95_ms"] >= figures["batch32_p50_ms"]
    assert figures["threads"] == 1
    assert figures["runs"] == 30


def test_peak_memory_of_a_fresh_process_loading_the_bundle(iris_mlp):
    peak = measure.peak_memory(iris_mlp)
    assert peak is not None
    assert 10 * 2**20 < peak < 64 * 2**30  # a Python process with torch: tens of MB at least


def test_peak_memory_is_none_when_the_bundle_cannot_load(tmp_path):
    assert measure.peak_memory(tmp_path / "missing") is None


def test_disk_bytes_sums_the_bundle_files(iris_mlp):
    expected = sum(p.stat().st_size for p in iris_mlp.iterdir() if p.is_file())
    assert measure.disk_bytes(iris_mlp) == expected


def test_machine_names_cores_and_versions():
    info = measure.machine()
    assert isinstance(info["cores"], int)
    assert info["cores"] >= 1
    assert {"torch", "onnxruntime", "numpy"} <= set(info["versions"])
    assert info["python"].count(".") == 2
    assert isinstance(info["cpu"], str)
    assert info["cpu"]
    assert isinstance(info["cpu_flags"], list)
    assert "cuda" in info


def test_to_json_round_trips():
    import json

    data = {"a": 1, "b": [1.5, None]}
    assert json.loads(measure.to_json(data)) == data


def test_latency_pads_a_short_sample_to_batch_32(iris_mlp):
    bundle = kiln.load(str(iris_mlp))
    sample = np.zeros((1, 4), dtype=np.float32)
    figures = measure.latency(bundle, sample, runs=30)
    assert figures["threads"] >= 1
    assert figures["throughput_rows_per_s"] == pytest.approx(32 / (figures["batch32_p50_ms"] / 1e3))


def test_plot_labels_never_overlap_even_when_the_points_crowd():
    """Seven variants almost on one spot (same size, latency and accuracy within 0.002):
    every label's box, rendered with Agg, is clear of every other label and inside its axes."""
    import matplotlib.pyplot as plt

    reports = [_report(1000 + i, 0.5 + 0.001 * i, 0.90 - 0.0003 * i) for i in range(7)]
    reports.append(_report(100, 3.0, 0.5))  # one far away: the crowd is a small part of the axes
    names = ["source", *(f"{i:02d}-prune" for i in range(1, 8))]
    fig = figure(rows(reports, names), "accuracy")
    try:
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            boxes = [t.get_window_extent(renderer) for t in ax.texts]
            assert sorted(t.get_text() for t in ax.texts) == sorted(names)
            inside = ax.get_window_extent(renderer)
            for i, a in enumerate(boxes):
                assert inside.x0 <= a.x0 and a.x1 <= inside.x1, ax.texts[i].get_text()
                assert inside.y0 <= a.y0 and a.y1 <= inside.y1, ax.texts[i].get_text()
                for j in range(i):
                    assert not a.overlaps(boxes[j]), (
                        ax.texts[i].get_text(),
                        ax.texts[j].get_text(),
                    )
    finally:
        plt.close(fig)
