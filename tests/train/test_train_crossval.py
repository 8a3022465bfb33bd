"""k-fold cross-validation."""

from __future__ import annotations

import statistics

import pytest

import kiln
from kiln.errors import DataError
from kiln.train.crossval import crossval


def test_crossval_returns_k_folds_with_mean_and_std(make_spec):
    seen = []
    result = kiln.crossval(
        make_spec(train={"epochs": 5}),
        folds=3,
        on_fold=lambda i, metrics: seen.append((i, metrics["accuracy"])),
    )
    assert len(result.folds) == 3
    assert [i for i, _ in seen] == [0, 1, 2]
    accs = [f["accuracy"] for f in result.folds]
    assert result.mean["accuracy"] == pytest.approx(statistics.fmean(accs))
    assert result.std["accuracy"] == pytest.approx(statistics.stdev(accs))
    assert result.mean["accuracy"] > 0.6  # iris is easy even for a few epochs
    assert {"f1_macro", "log_loss", "roc_auc"} <= set(result.mean)
    assert "confusion_matrix" not in result.mean  # only scalars are averaged
    # Each held-out fold is a third of iris.
    assert all(sum(map(sum, f["confusion_matrix"])) == 50 for f in result.folds)
    assert result.to_dict()["k"] == 3


def test_crossval_regression_and_val_split(make_spec):
    spec = make_spec(
        name="diabetes",
        task="regression",
        data={"source": "sklearn:diabetes", "split": {"val": 0.2}},
        train={"epochs": 3, "early_stopping": {"patience": 2, "metric": "val_rmse"}},
    )
    result = crossval(spec, folds=2)
    assert len(result.folds) == 2
    assert set(result.mean) == {"mse", "rmse", "mae", "r2"}
    assert all(1 <= f["epochs_run"] <= 3 for f in result.folds)
    assert result.mean["rmse"] == pytest.approx(statistics.fmean(f["rmse"] for f in result.folds))


def test_crossval_fold_count_errors(make_spec):
    with pytest.raises(DataError, match="folds must be at least 2"):
        crossval(make_spec(), folds=1)


def test_crossval_with_a_small_val_fraction_works_like_fit(make_spec):
    spec = make_spec(data={"split": {"val": 0.01}}, train={"epochs": 1})
    assert kiln.fit(spec).meta.lineage.split.val == 3  # one row per class
    assert len(crossval(spec, folds=5).folds) == 5
