"""Gradient-boosted trees (model.type: gbdt) through kiln.fit, on tiny tables made here.

Each test runs for both libraries: LightGBM and XGBoost. The tables hold a numeric
column with missing values and a string categorical column (with missing values too),
so the native preprocessing (NaN kept, category codes) is exercised every time.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import kiln
from kiln.bundle import Bundle
from kiln.data.preprocess_state import CategoricalFeature, NumericFeature
from kiln.errors import SpecError
from kiln.models.gbdt import GBDTModel
from kiln.train.callbacks import Callback, JsonlLog, TrainSummary
from kiln.train.checkpoint import EpochEntry

LIBRARIES = ["lightgbm", "xgboost"]
COLORS = ["red", "green", "blue"]


def tree_table(n: int = 300, *, task: str = "binary", seed: int = 0) -> pd.DataFrame:
    """x1 (numeric, every 7th missing), x2 (noise), color (string, every 11th missing)
    and a label/target that depends on x1 and color."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=n)
    color = rng.choice(COLORS, size=n).astype(object)
    signal = x1 + 1.5 * (color == "red") - 1.0 * (color == "blue")
    x1[::7] = np.nan
    color[::11] = None
    frame = pd.DataFrame({"x1": x1, "x2": rng.uniform(0, 10, size=n), "color": color})
    if task == "binary":
        frame["label"] = np.where(signal > 0.3, "yes", "no")
    elif task == "multiclass":
        frame["label"] = np.select([signal < -0.5, signal < 0.8], ["low", "mid"], "high")
    else:
        frame["label"] = 3.0 * signal + rng.normal(scale=0.3, size=n) + 10.0
    return frame


def gbdt_spec(
    source: Path, library: str, *, task: str = "classification", **model: Any
) -> dict[str, Any]:
    return {
        "name": "trees",
        "task": task,
        "data": {"source": str(source), "target": "label", "split": {"test": 0.2, "val": 0.2}},
        "model": {
            "type": "gbdt",
            "library": library,
            "n_estimators": 30,
            "learning_rate": 0.2,
            "num_leaves": 8,
            "min_child_samples": 5,
            **model,
        },
        "train": {"seed": 0},
    }


def write(tmp_path: Path, frame: pd.DataFrame, name: str = "table.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def fit(spec: dict[str, Any], **kwargs: Any) -> Bundle:
    bundle = kiln.fit(spec, **kwargs)
    assert isinstance(bundle, Bundle)
    return bundle


# ---- classification and regression --------------------------------------------------


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_classification_learns_with_native_missing_and_categories(
    tmp_path: Path, library: str, kind: str
) -> None:
    frame = tree_table(task=kind)
    bundle = fit(gbdt_spec(write(tmp_path, frame), library))
    model = bundle.model
    assert isinstance(model, GBDTModel) and model.library == library
    classes = 2 if kind == "binary" else 3
    assert bundle.meta.n_outputs == classes
    assert bundle.meta.metrics["test"]["accuracy"] > 0.8
    assert bundle.meta.training.epochs_run == 30
    assert model.summary().rounds == 30
    assert model.summary().trees == 30 * (1 if classes == 2 else classes)

    # native preprocessing: unscaled numbers with NaN kept, category codes with NaN
    features = {f.name: f for f in bundle.preprocessor.state.features}
    assert isinstance(features["x1"], NumericFeature) and features["x1"].native_missing
    assert isinstance(features["color"], CategoricalFeature)
    assert features["color"].encoding == "native"
    encoded = bundle.preprocessor.transform(frame.drop(columns="label"))
    assert encoded.shape == (len(frame), 3)
    np.testing.assert_array_equal(np.isnan(encoded[:, 0]), frame["x1"].isna().to_numpy())
    np.testing.assert_allclose(encoded[:, 1], frame["x2"], rtol=1e-6)  # not scaled
    codes = encoded[:, 2]
    assert np.isnan(codes[frame["color"].isna().to_numpy()]).all()
    known = codes[~np.isnan(codes)]
    assert set(known.tolist()) == {0.0, 1.0, 2.0}
    assert model.categorical == [2]

    # an unseen category and nulls predict fine
    rows = [
        {"x1": None, "x2": 5.0, "color": "purple"},
        {"x1": 0.5, "x2": None, "color": None},
        {"x1": 2.0, "x2": 1.0, "color": "red"},
    ]
    pred = bundle.predict(rows)
    probs = np.asarray(pred.probabilities)
    assert probs.shape == (3, classes)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert pred.predictions[2] == ("yes" if kind == "binary" else "high")


@pytest.mark.parametrize("library", LIBRARIES)
def test_logits_follow_kiln_convention(tmp_path: Path, library: str) -> None:
    """Binary: [0, margin], whose softmax is the booster's own probability."""
    import torch

    frame = tree_table()
    bundle = fit(gbdt_spec(write(tmp_path, frame), library))
    model = bundle.model
    assert isinstance(model, GBDTModel)
    x = bundle.preprocessor.transform(frame.drop(columns="label"))
    logits = model(torch.from_numpy(x)).numpy()
    assert logits.shape == (len(frame), 2)
    np.testing.assert_array_equal(logits[:, 0], 0.0)
    booster = model.booster
    own = booster.predict(x) if library == "lightgbm" else booster.inplace_predict(x)
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()[:, 1]
    np.testing.assert_allclose(probs, own, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("library", LIBRARIES)
def test_regression_learns_and_logs_rmse_in_target_units(tmp_path: Path, library: str) -> None:
    frame = tree_table(task="regression")
    bundle = fit(gbdt_spec(write(tmp_path, frame), library, task="regression"))
    metrics = bundle.meta.metrics
    assert metrics["test"]["r2"] > 0.7
    history = bundle.meta.training.history
    assert len(history) == 30
    assert all(
        {"train_loss", "val_loss", "val_rmse", "val_mae", "val_r2"} <= set(h) for h in history
    )
    # the last round's logged val_rmse is the model's val rmse (target units)
    assert history[-1]["val_rmse"] == pytest.approx(metrics["val"]["rmse"], rel=1e-3)
    assert history[-1]["val_mae"] == pytest.approx(metrics["val"]["mae"], rel=1e-3)
    pred = bundle.predict([{"x1": None, "x2": None, "color": "purple"}])
    assert np.isfinite(pred.predictions[0])


# ---- class weights --------------------------------------------------------------------


def imbalanced(n: int = 400, seed: int = 1) -> pd.DataFrame:
    """About 12% positives, only weakly separable: weighting moves the threshold."""
    frame = tree_table(n, seed=seed)
    rng = np.random.default_rng(seed)
    x1 = frame["x1"].fillna(0.0).to_numpy()
    score = x1 + rng.normal(scale=1.0, size=n)
    frame["label"] = np.where(score > 1.6, "yes", "no")
    return frame


@pytest.mark.parametrize("library", LIBRARIES)
def test_class_weight_balanced_and_dict_move_the_probabilities(
    tmp_path: Path, library: str
) -> None:
    frame = imbalanced()
    source = write(tmp_path, frame)
    rows = frame.drop(columns="label")

    def mean_positive(**model: Any) -> float:
        spec = gbdt_spec(source, library, n_estimators=10, learning_rate=0.1, **model)
        probabilities = np.asarray(fit(spec).predict(rows).probabilities)
        return float(probabilities[:, 1].mean())  # columns in label order: no, yes

    plain = mean_positive()
    assert plain == pytest.approx(0.13, abs=0.03)  # the share of "yes"
    assert mean_positive(class_weight="balanced") > plain + 0.05
    assert mean_positive(class_weight={"yes": 6.0}) > plain + 0.05
    assert mean_positive(class_weight={"no": 6.0}) < plain - 0.02  # the label's own class


def test_class_weight_with_a_label_not_in_the_data_names_the_field(tmp_path: Path) -> None:
    spec = gbdt_spec(write(tmp_path, tree_table()), "lightgbm", class_weight={"maybe": 2.0})
    with pytest.raises(SpecError, match="maybe") as info:
        kiln.fit(spec)
    assert info.value.field == "model.class_weight"


# ---- early stopping, history, callbacks -----------------------------------------------


def noisy(n: int = 300, seed: int = 2) -> pd.DataFrame:
    """A label that is mostly noise: val loss bottoms out after a few rounds."""
    frame = tree_table(n, seed=seed)
    rng = np.random.default_rng(seed)
    flip = rng.uniform(size=n) < 0.4
    frame["label"] = np.where(flip, np.where(frame["label"] == "yes", "no", "yes"), frame["label"])
    return frame


@pytest.mark.parametrize("library", LIBRARIES)
def test_early_stopping_keeps_the_best_round(tmp_path: Path, library: str) -> None:
    spec = gbdt_spec(
        write(tmp_path, noisy()),
        library,
        n_estimators=50,
        learning_rate=0.5,
        num_leaves=16,
        min_child_samples=2,
    )
    spec["train"]["early_stopping"] = {"patience": 4, "metric": "val_loss"}
    out = tmp_path / "bundle"
    bundle = fit(spec, out=out)
    t = bundle.meta.training
    assert t.stopped_early
    assert t.best_epoch is not None
    assert len(t.history) == t.epochs_run == t.best_epoch + 4 < 50
    losses = [h["val_loss"] for h in t.history]
    assert t.best_epoch == int(np.argmin(losses)) + 1
    # the kept trees are the best round's: its val log loss, and the saved booster
    assert bundle.meta.metrics["val"]["log_loss"] == pytest.approx(
        losses[t.best_epoch - 1], rel=1e-4
    )
    assert isinstance(bundle.model, GBDTModel)
    assert bundle.model.summary().rounds == t.best_epoch
    reloaded = kiln.load(str(out))
    assert isinstance(reloaded.model, GBDTModel)
    assert reloaded.model.summary().rounds == t.best_epoch


@pytest.mark.parametrize("library", LIBRARIES)
def test_every_round_is_an_epoch_for_the_callbacks(tmp_path: Path, library: str) -> None:
    class Counting(Callback):
        def __init__(self) -> None:
            self.started: int | None = None
            self.epochs: list[EpochEntry] = []
            self.batches = 0
            self.summary: TrainSummary | None = None

        def on_train_start(self, epochs: int, start_epoch: int) -> None:
            self.started = epochs

        def on_batch_end(self) -> None:
            self.batches += 1

        def on_epoch_end(self, logs: EpochEntry) -> None:
            self.epochs.append(logs)

        def on_train_end(self, summary: TrainSummary) -> None:
            self.summary = summary

    counting, stream = Counting(), io.StringIO()
    spec = gbdt_spec(write(tmp_path, tree_table(task="multiclass")), library, n_estimators=12)
    bundle = fit(spec, callbacks=[counting, JsonlLog(stream)])
    assert counting.started == 12
    assert [e["epoch"] for e in counting.epochs] == list(range(1, 13))
    assert counting.batches == 12
    assert counting.summary is not None and counting.summary["epochs_run"] == 12
    assert all({"train_loss", "val_loss", "val_accuracy"} <= set(e) for e in counting.epochs)
    # the last round's val accuracy is the model's
    val_acc = bundle.meta.metrics["val"]["accuracy"]
    assert counting.epochs[-1]["val_accuracy"] == pytest.approx(val_acc, abs=1e-6)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["start"] + ["epoch"] * 12 + ["end"]
    assert events[0]["epochs"] == 12
    assert bundle.meta.training.history == counting.epochs


# ---- spec refusals --------------------------------------------------------------------


def _spec(**sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "t",
        "task": "classification",
        "data": {"source": "t.csv", "target": "label"},
        "model": {"type": "gbdt"},
    }
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    return spec


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (_spec(train={"optimizer": {"name": "sgd", "lr": 0.1}}), "train.optimizer"),
        (_spec(train={"epochs": 5}), "train.epochs"),
        (_spec(train={"batch_size": 64}), "train.batch_size"),
        (
            _spec(
                model={"type": "mlp", "hidden": [4]}, data={"preprocessing": {"missing": "native"}}
            ),
            "data.preprocessing.missing",
        ),
        (
            _spec(
                model={"type": "mlp", "hidden": [4]},
                data={"preprocessing": {"categorical": "native"}},
            ),
            "data.preprocessing.categorical",
        ),
        (_spec(data={"text": "body"}), "model.type"),
        (
            _spec(train={"early_stopping": {"metric": "val_f1_macro", "patience": 3}}),
            "train.early_stopping.metric",
        ),
        (_spec(task="regression", model={"class_weight": "balanced"}), "model.class_weight"),
    ],
)
def test_spec_refusals_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as info:
        kiln.load_spec(spec)
    assert info.value.field == field, str(info.value)
    assert field in str(info.value)


def test_gbdt_defaults_to_native_preprocessing_unless_told() -> None:
    spec = kiln.load_spec(_spec())
    pre = spec.preprocessing
    assert (pre.missing, pre.categorical, pre.scale) == ("native", "native", "none")
    told = kiln.load_spec(_spec(data={"preprocessing": {"categorical": "onehot"}}))
    assert told.preprocessing.categorical == "onehot"
    assert told.preprocessing.missing == "native"


# ---- crossval -------------------------------------------------------------------------


@pytest.mark.parametrize("library", LIBRARIES)
def test_crossval_with_gbdt(tmp_path: Path, library: str) -> None:
    spec = gbdt_spec(write(tmp_path, tree_table()), library, n_estimators=20)
    spec["train"]["early_stopping"] = {"patience": 3, "metric": "val_loss"}
    result = kiln.crossval(spec, folds=3)
    assert len(result.folds) == 3
    assert result.mean["accuracy"] > 0.8
    assert all(1 <= f["epochs_run"] <= 20 for f in result.folds)
