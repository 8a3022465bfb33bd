"""The dashboard's figure specs (kiln.web.charts), read as the plain dicts pages embed:
axes per scale, legends that show, a Pareto front that can be drawn, sizes in the
tables' unit, count and latency axes that start at 0."""

from __future__ import annotations

import json
import math

import pytest

from kiln.web import charts
from kiln.web.charts import ParetoPoint
from kiln.web.pages import size


def _regression_epochs(n: int = 3) -> list[dict[str, float]]:
    return [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "val_loss": 1.1 / e,
            "val_mse": 2e10 / e,
            "val_rmse": 1.4e5 / e,
            "val_mae": 1.1e5 / e,
            "val_r2": 0.2 * e,
        }
        for e in range(1, n + 1)
    ]


def _axis_of(trace: charts.Trace) -> str:
    return trace.get("yaxis", "y")


def test_validation_errors_and_scores_get_separate_panels() -> None:
    figure = charts.validation_curves(_regression_epochs())
    by_axis = {t["name"]: _axis_of(t) for t in figure["data"]}
    assert by_axis == {"val_mae": "y", "val_mse": "y", "val_rmse": "y", "val_r2": "y2"}
    layout = figure["layout"]
    assert layout["grid"]["pattern"] == "independent"  # side by side, own ranges
    assert layout["yaxis"].get("type") == "log"  # 2e10 and 1e5 both readable
    assert "type" not in layout["yaxis2"]  # R² can be negative: linear
    assert layout["yaxis2"]["title"]["text"] == "val_r2"  # alone on its axis: named
    assert layout["xaxis2"]["title"]["text"] == "epoch"
    r2 = next(t for t in figure["data"] if t["name"] == "val_r2")
    assert r2["xaxis"] == "x2" and r2["y"] == pytest.approx([0.2, 0.4, 0.6])


def test_one_family_is_one_panel_and_a_log_axis_drops_what_it_cannot_draw() -> None:
    scores = charts.validation_curves([{"epoch": 1, "val_accuracy": 0.5, "val_f1_macro": 0.4}])
    assert "grid" not in scores["layout"] and "type" not in scores["layout"]["yaxis"]
    assert scores["layout"]["yaxis"]["title"]["text"] == "score"
    errors = charts.validation_curves([{"epoch": 1, "val_mse": 0.0}, {"epoch": 2, "val_mse": 4}])
    assert errors["layout"]["yaxis"] == {"title": {"text": "val_mse"}, "type": "log"}
    assert errors["data"][0]["x"] == [2]  # 0 has no place on a log axis


def test_legends_show_even_for_one_trace_and_sit_below_the_axis_title() -> None:
    one = charts.validation_curves([{"epoch": 1, "val_accuracy": 0.5}])
    assert len(one["data"]) == 1
    for figure in (one, charts.loss_curves(_regression_epochs())):
        layout = figure["layout"]
        assert layout["showlegend"] is True
        # the legend hangs from the figure's bottom edge, inside the bottom margin that
        # also holds the axis title: the two never share a row
        assert layout["legend"] == {
            "orientation": "h",
            "x": 0,
            "y": 0,
            "yref": "container",
            "yanchor": "bottom",
        }
        assert layout["margin"]["b"] >= 80
        assert layout["xaxis"]["title"]["text"] == "epoch"
    assert one["layout"]["yaxis"]["title"]["text"] == "val_accuracy"


def test_few_epochs_tick_whole_numbers() -> None:
    assert charts.loss_curves(_regression_epochs(4))["layout"]["xaxis"]["dtick"] == 1
    many = charts.loss_curves(_regression_epochs(charts.WHOLE_EPOCHS + 1))
    assert "dtick" not in many["layout"]["xaxis"]


def _point(label: str, size_: float, p50: float, metric: float, *, front: bool) -> ParetoPoint:
    return {
        "metric_name": "accuracy",
        "label": label,
        "bytes": size_,
        "p50_ms": p50,
        "metric": metric,
        "source_metric": 0.9,
        "front_size": front,
        "front_latency": front,
    }


VARIANTS = [
    _point("v2 int8", 12_000, 0.2, 0.89, front=True),
    _point("v3 pruned", 20_000, 0.5, 0.86, front=False),
    _point("v4 fp16", 30_000, 0.3, 0.895, front=True),
]


def test_pareto_sizes_are_in_the_tables_unit() -> None:
    figure = charts.pareto(VARIANTS, "accuracy", higher_is_better=True)
    assert figure["layout"]["xaxis"]["title"]["text"] == "model size (KiB)"
    assert size(12_000) == "11.7 KiB"  # the versions table's text of the same size
    assert figure["data"][0]["x"] == pytest.approx([12_000 / 1024, 20_000 / 1024, 30_000 / 1024])
    big = [_point("v9", 5 * 1024**2, 1.0, 0.9, front=True)]
    assert charts.pareto(big, "accuracy", True)["layout"]["xaxis"]["title"]["text"] == (
        "model size (MiB)"
    )
    assert charts.size_unit(512) == ("B", 1.0)


def test_the_pareto_front_is_a_drawable_staircase_sorted_by_cost() -> None:
    figure = charts.pareto(VARIANTS, "accuracy", higher_is_better=True)
    for front in (figure["data"][1], figure["data"][3]):
        assert front["mode"] == "lines" and front["line"]["shape"] == "hv"
        assert len(front["x"]) >= 2 and list(front["x"]) == sorted(front["x"])  # type: ignore[type-var]
        assert front["showlegend"] is True
    size_front = figure["data"][1]
    assert size_front["x"] == pytest.approx([12_000 / 1024, 30_000 / 1024])
    assert size_front["y"] == [0.89, 0.895]
    latency = figure["data"][3]  # v4 is faster than v3: the front runs on to v3's cost
    assert latency["x"] == [0.2, 0.3, 0.5] and latency["y"] == [0.89, 0.895, 0.895]


def test_a_lone_front_point_still_draws_a_line_to_the_costliest_variant() -> None:
    lone = [
        _point("v2", 12_000, 0.2, 0.89, front=True),
        _point("v3", 20_000, 0.5, 0.86, front=False),
    ]
    front = charts.pareto(lone, "accuracy", True)["data"][1]
    assert front["x"] == pytest.approx([12_000 / 1024, 20_000 / 1024])
    assert front["y"] == [0.89, 0.89]
    only = charts.pareto(lone[:1], "accuracy", True)["data"][1]
    assert len(only["x"]) == 2  # one variant: a line of no length, and no legend entry
    assert only["showlegend"] is False


def test_pareto_axes_are_padded_around_every_point_with_plain_log_ticks() -> None:
    layout = charts.pareto(VARIANTS, "accuracy", higher_is_better=True)["layout"]
    sizes = [12_000 / 1024, 30_000 / 1024]
    for name, values in (("xaxis", sizes), ("xaxis2", [0.2, 0.5])):
        axis = layout[name]  # type: ignore[literal-required]
        assert axis["type"] == "log" and axis["tickformat"] == "~g"
        low, high = axis["range"]
        assert low < math.log10(min(values)) and math.log10(max(values)) < high
    low, high = layout["yaxis"]["range"]
    assert low < 0.86 and high > 0.9  # the variants and the source's dashed line
    assert layout["yaxis2"]["range"] == layout["yaxis"]["range"]


def test_traffic_and_usage_axes_start_at_zero() -> None:
    series = [{"time": 1_700_000_000 + 5 * i, "requests_per_s": 0.0} for i in range(3)]
    layout = charts.traffic(series)["layout"]  # type: ignore[arg-type]
    assert layout["yaxis"]["rangemode"] == "tozero"
    assert layout["yaxis2"]["rangemode"] == "tozero"
    summary = {"items": [{"kind": "prediction_rows", "period": "2026-01-01", "quantity": 0}]}
    for figure in charts.usage(summary, ["2026-01-01"]):
        assert figure["layout"]["yaxis"]["rangemode"] == "tozero"


def test_figures_are_plain_json() -> None:
    for figure in (
        charts.validation_curves(_regression_epochs()),
        charts.pareto(VARIANTS, "accuracy", True),
    ):
        assert json.loads(json.dumps(figure)) == figure
