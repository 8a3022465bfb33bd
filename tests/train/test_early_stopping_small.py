"""Early stopping on small validation splits: the smoothed (EMA) monitored value and
k-fold early stopping, their ``auto`` defaults, the spec fields, and real fits that
record and resume them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from pydantic import ValidationError

import kiln
from kiln.data.split import kfold
from kiln.errors import Interrupted
from kiln.manifest import TrainingRecord
from kiln.models import build
from kiln.spec import MLPSpec, TrainSpec
from kiln.spec.load import load_spec
from kiln.spec.train import EarlyStopping
from kiln.train.callbacks import Callback
from kiln.train.checkpoint import DirCheckpoints, EpochEntry
from kiln.train.early_stopping import (
    AUTO_ALPHA,
    AUTO_FOLDS,
    SMALL_VAL_ROWS,
    Smoothing,
    best_epoch_of,
    fold_count,
    mean_curve,
    monitored_value,
    smoothed_key,
    smoothing_factor,
)
from kiln.train.loop import FitResult, TensorData, fit_model
from kiln.train.recipe import load_table, train_frames
from kiln.workflow import _Frames


def noisy_curve() -> list[float]:
    """A U-shaped validation loss with its true minimum at epoch 30, small alternating
    noise, and one lucky dip at epoch 12 (a few easy rows happened to fit well)."""
    curve = []
    for t in range(1, 61):
        v = 0.3 + 0.2 * (t - 30) ** 2 / 900 + (0.02 if t % 2 else -0.02)
        curve.append(v - 0.12 if t == 12 else v)
    return curve


def best_epoch(curve: list[float], alpha: float | None) -> int:
    """The epoch with the lowest monitored value, as the engine computes it."""
    history: list[EpochEntry] = []
    values = []
    for t, v in enumerate(curve, start=1):
        logs: EpochEntry = {"epoch": t, "val_loss": v}
        values.append(monitored_value(logs, "val_loss", history, alpha))
        history.append(logs)
    return values.index(min(values)) + 1


def test_smoothing_ignores_a_lucky_epoch_that_raw_picking_takes() -> None:
    curve = noisy_curve()
    assert best_epoch(curve, None) == 12  # the raw minimum is the lucky dip
    smoothed = best_epoch(curve, AUTO_ALPHA)
    # the EMA lags the curve by about (1 - a) / a epochs: it lands just past the true 30
    assert 28 <= smoothed <= 36


def test_monitored_value_is_the_ema_and_is_logged() -> None:
    history: list[EpochEntry] = [{"epoch": 1, "val_loss": 1.0, "val_loss_smoothed": 1.0}]
    logs: EpochEntry = {"epoch": 2, "val_loss": 0.0}
    assert monitored_value(logs, "val_loss", history, 0.25) == pytest.approx(0.75)
    assert logs[smoothed_key("val_loss")] == pytest.approx(0.75)
    raw: EpochEntry = {"epoch": 2, "val_loss": 0.0}
    assert monitored_value(raw, "val_loss", history, None) == 0.0
    assert smoothed_key("val_loss") not in raw


def test_auto_smooths_small_validation_splits_only() -> None:
    assert smoothing_factor("auto", "val_loss", SMALL_VAL_ROWS - 1) == AUTO_ALPHA
    assert smoothing_factor("auto", "val_accuracy", 24) == AUTO_ALPHA
    assert smoothing_factor("auto", "val_loss", SMALL_VAL_ROWS) is None
    assert smoothing_factor("auto", "val_loss", None) is None  # no validation split
    assert smoothing_factor("auto", "train_loss", 24) is None  # not measured on val rows
    assert smoothing_factor("none", "val_loss", 24) is None
    assert smoothing_factor(0.5, "val_loss", 10_000) == 0.5


def test_spec_field() -> None:
    assert EarlyStopping().smoothing == "auto"
    assert EarlyStopping(smoothing="none").smoothing == "none"
    assert EarlyStopping(smoothing=0.5).smoothing == 0.5
    assert EarlyStopping(smoothing=1).smoothing == 1.0
    for bad in (0.0, -0.1, 1.5, "sometimes"):
        with pytest.raises(ValidationError, match="smoothing"):
            EarlyStopping(smoothing=bad)
    described = EarlyStopping.model_fields["smoothing"].description
    assert described is not None and "200" in described


def data(n_val: int, seed: int = 0) -> TensorData:
    """Noisy 2-class rows: 96 to train on, ``n_val`` to validate on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96 + n_val, 4, generator=g)
    y = ((x[:, 0] + 0.8 * torch.randn(96 + n_val, generator=g)) > 0).long()
    return TensorData(x[:96], y[:96], x[96:], y[96:])


def fit(d: TensorData, smoothing: Smoothing = "auto", **kw: Any) -> FitResult:
    torch.manual_seed(0)
    model = build(MLPSpec(hidden=[8]), 4, 2)
    spec = TrainSpec(
        epochs=kw.pop("epochs", 12),
        batch_size=16,
        device="cpu",
        optimizer={"name": "adam", "lr": 0.05},
        early_stopping={"patience": 100, "metric": "val_loss", "smoothing": smoothing},
    )
    return fit_model(model, d, spec, "classification", "cross_entropy", **kw)


def test_a_fit_records_the_smoothed_rule_and_picks_by_it() -> None:
    result = fit(data(n_val=40))
    key = smoothed_key("val_loss")
    assert all(key in e for e in result.history)  # auto: on for 40 validation rows
    ema = result.history[0]["val_loss"]
    for e in result.history[1:]:
        ema = AUTO_ALPHA * e["val_loss"] + (1 - AUTO_ALPHA) * ema
        assert e[key] == pytest.approx(ema)
    smoothed = [e[key] for e in result.history]
    assert result.best_epoch == smoothed.index(min(smoothed)) + 1

    raw = fit(data(n_val=40), smoothing="none")
    assert not any(key in e for e in raw.history)
    losses = [e["val_loss"] for e in raw.history]
    assert raw.best_epoch == losses.index(min(losses)) + 1

    large = fit(data(n_val=SMALL_VAL_ROWS), epochs=2)
    assert not any(key in e for e in large.history)  # auto: off at 200 rows


class StopAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, logs: EpochEntry) -> None:
        if logs["epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_resume_continues_the_average(tmp_path: Path) -> None:
    whole = fit(data(n_val=40), epochs=8)
    store = DirCheckpoints(tmp_path / "ckpt")
    with pytest.raises(Interrupted):
        fit(data(n_val=40), epochs=8, checkpoints=store, callbacks=[StopAt(4)])
    resumed = fit(data(n_val=40), epochs=8, checkpoints=store, resume=True)
    key = smoothed_key("val_loss")
    assert [e[key] for e in resumed.history] == [e[key] for e in whole.history]
    assert resumed.best_epoch == whole.best_epoch


# --- k-fold early stopping -------------------------------------------------------------


def test_mean_curve_holds_a_stopped_fold_at_its_last_value() -> None:
    # the second fold stopped after 4 epochs: it counts as 3.0 at epoch 5
    assert mean_curve([[3.0, 2.0, 1.0, 2.0, 3.0], [3.0, 1.0, 2.0, 3.0]]) == [
        3.0,
        1.5,
        1.5,
        2.5,
        3.0,
    ]


def test_best_epoch_of_the_mean_curve_applies_patience_to_it() -> None:
    curve = [1.0, 0.9, 0.95, 0.96, 0.5]
    assert best_epoch_of(curve, "min", patience=2, min_delta=0.0) == 2  # stops before 0.5
    assert best_epoch_of(curve, "min", patience=3, min_delta=0.0) == 5
    assert best_epoch_of(curve, "min", patience=3, min_delta=0.45) == 1  # 0.9 is not 0.45 better
    assert best_epoch_of([0.5, 0.7, 0.6], "max", patience=5, min_delta=0.0) == 2


def test_auto_folds_switch_at_the_threshold() -> None:
    assert fold_count("auto", "val_loss", SMALL_VAL_ROWS - 1) == AUTO_FOLDS
    assert fold_count("auto", "val_accuracy", 24) == AUTO_FOLDS
    assert fold_count("auto", "val_loss", SMALL_VAL_ROWS) is None
    assert fold_count("auto", "val_loss", None) is None
    assert fold_count("auto", "train_loss", 24) is None
    assert fold_count("none", "val_loss", 24) is None
    assert fold_count(3, "val_loss", 10_000) == 3


def test_folds_spec_field_and_old_specs() -> None:
    assert EarlyStopping().folds == "none"  # the default; a spec written before loads
    assert EarlyStopping(folds="auto").folds == "auto"
    assert EarlyStopping(folds=3).folds == 3
    for bad in (1, 0, "sometimes", 2.5):
        with pytest.raises(ValidationError, match="folds"):
            EarlyStopping(folds=bad)
    described = EarlyStopping.model_fields["folds"].description
    assert described is not None and "200" in described and "train+val" in described


def wine(**stopping: Any) -> dict[str, Any]:
    """178 rows, 3 classes; the default split leaves 18 validation rows."""
    return {
        "name": "wine",
        "task": "classification",
        "data": {"source": "sklearn:wine", "target": "target"},
        "model": {"type": "mlp", "hidden": [8]},
        "train": {
            "epochs": 25,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
            "early_stopping": {"metric": "val_loss", "patience": 4, **stopping},
        },
    }


def weights(bundle: object) -> dict[str, torch.Tensor]:
    assert isinstance(bundle, kiln.Bundle) and bundle.model is not None
    return dict(bundle.model.state_dict())


def test_kfold_picks_the_mean_curve_epoch_and_refits_on_train_and_val() -> None:
    bundle = kiln.fit(wine(folds="auto"))  # 18 validation rows: 5 folds
    choice = bundle.meta.training.epoch_choice
    assert choice is not None and choice.folds == AUTO_FOLDS

    # the folds by hand: 5 stratified folds of train+val, each stopping on its fold
    spec = load_spec(wine(folds="none"))
    table = load_table(spec)
    frames = _Frames.split(spec, table)
    rows = pd.concat([frames.train, frames.val])
    curves = []
    for fit_pos, stop_pos in kfold(rows["target"], 5, True, spec.data.split.seed):
        fold = train_frames(spec, table, rows.iloc[fit_pos], rows.iloc[stop_pos])
        curves.append([e["val_loss"] for e in fold.result.history])
    assert choice.mean_curve == pytest.approx(mean_curve(curves))
    assert choice.best_epoch == best_epoch_of(choice.mean_curve, "min", 4, 0.0)
    assert choice.best_value == pytest.approx(choice.mean_curve[choice.best_epoch - 1])

    # the final model: all of train+val, exactly best_epoch epochs, no early stopping
    training = bundle.meta.training
    assert training.epochs_run == len(training.history) == choice.best_epoch
    assert not training.stopped_early and training.best_epoch is None
    assert not any("val_loss" in e for e in training.history)  # nothing held out
    final = spec.model_copy(
        update={
            "train": spec.train.model_copy(
                update={"epochs": choice.best_epoch, "early_stopping": None}
            )
        }
    )
    refit = train_frames(final, table, rows, None)
    for name, weight in refit.model.state_dict().items():
        assert torch.equal(weight, weights(bundle)[name])

    # the val rows were trained on: not reported as validation metrics
    assert set(bundle.metrics) == {"test"}
    saved = bundle.meta.training.model_dump(mode="json")
    assert saved["epoch_choice"]["by"] == "kfold"
    assert TrainingRecord.model_validate(saved).epoch_choice == training.epoch_choice


def test_by_default_early_stopping_stops_on_the_validation_split() -> None:
    bundle = kiln.fit(wine())  # folds: none, smoothing: auto
    assert bundle.meta.training.epoch_choice is None
    assert set(bundle.metrics) == {"test", "val"}
    assert "epoch_choice" not in bundle.meta.training.model_dump(mode="json")
    assert all(smoothed_key("val_loss") in e for e in bundle.meta.training.history)


def test_kfold_fit_resumes(tmp_path: Path) -> None:
    whole = kiln.fit(wine(folds=3))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):  # in the final fit: the folds run silently
        kiln.fit(wine(folds=3), checkpoints=ckpt, callbacks=[StopAt(2)])
    resumed = kiln.fit(wine(folds=3), checkpoints=ckpt, resume=True)
    assert resumed.meta.training.epoch_choice is not None
    assert resumed.meta.training.epoch_choice.folds == 3
    assert resumed.meta.training.resumed_from_epoch == 2
    losses = [e["train_loss"] for e in resumed.meta.training.history]
    assert losses == [e["train_loss"] for e in whole.meta.training.history]
    for name, weight in weights(resumed).items():
        assert torch.equal(weight, weights(whole)[name])
