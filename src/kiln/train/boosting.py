"""Boosting a :class:`~kiln.models.gbdt.GBDTModel`: the tree libraries' own training,
with kiln's callbacks, early stopping and history.

Each boosting round is one entry of the history (``epoch`` = round) with the training
loss and the validation metrics the library computes incrementally (loss, error rate,
L2/L1), converted to kiln's names and units. Early stopping follows
``train.early_stopping`` (``patience`` rounds, ``min_delta``) and keeps the best
round's trees only, so the saved booster is the model that was scored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import SpecError
from kiln.models.gbdt import GBDTModel
from kiln.spec.model import GBDTSpec
from kiln.spec.spec import metric_mode
from kiln.spec.train import TrainSpec
from kiln.train.callbacks import Callback, TrainSummary
from kiln.train.checkpoint import EpochEntry
from kiln.train.loop import FitResult, TensorData

# kiln loss -> (lightgbm objective, xgboost objective) for regression
_REGRESSION_OBJECTIVES = {
    "mse": ("regression", "reg:squarederror"),
    "mae": ("regression_l1", "reg:absoluteerror"),
    "huber": ("huber", "reg:pseudohubererror"),
}


@dataclass(frozen=True)
class Problem:
    """What is boosted: the task, the class count (0 for regression), the loss, and the
    regression target's scale (errors are logged in the target's units)."""

    task: str
    classes: int
    loss: str
    target_scale: float = 1.0
    labels: tuple[str, ...] = ()  # the class labels as category names, in class order

    @property
    def loss_metric(self) -> str:
        """The library metric logged as the loss: log loss for classes; for regression
        L1 under ``mae``, else L2 (huber is logged as L2), in scaled target units as
        the torch engine logs its loss."""
        if self.task == "classification":
            return "logloss"
        return "l1" if self.loss == "mae" else "l2"


@dataclass
class _Rounds:
    """The history and early-stopping state, updated after each round."""

    train: TrainSpec
    problem: Problem
    y_val_var: float | None
    callbacks: Sequence[Callback]
    started: float = field(default_factory=time.perf_counter)
    history: list[EpochEntry] = field(default_factory=list)
    best_value: float | None = None
    best_round: int | None = None
    bad_rounds: int = 0

    def record(self, round_no: int, train: dict[str, float], val: dict[str, float]) -> bool:
        """Log one round (1-based) from the library's train and val scores; True when
        early stopping says stop."""
        logs = self._entry(round_no, train, val)
        self.history.append(logs)
        for cb in self.callbacks:
            cb.on_batch_end()  # raising here cancels (a cancelled job), as in the engine
            cb.on_epoch_end(logs)
        return self._track(logs)

    def _entry(self, round_no: int, train: dict[str, float], val: dict[str, float]) -> EpochEntry:
        p = self.problem
        logs: EpochEntry = {"epoch": float(round_no), "train_loss": train[p.loss_metric]}
        if val:
            logs["val_loss"] = val[p.loss_metric]
            if p.task == "classification":
                logs["val_accuracy"] = 1.0 - val["error"]
                logs["val_log_loss"] = val["logloss"]
            else:
                mse = val["l2"] * p.target_scale**2
                logs["val_mse"] = mse
                logs["val_rmse"] = math.sqrt(mse)
                logs["val_mae"] = val["l1"] * p.target_scale
                if self.y_val_var:
                    logs["val_r2"] = 1.0 - val["l2"] / self.y_val_var
        logs["seconds"] = round(time.perf_counter() - self.started, 4)
        return logs

    def _track(self, logs: EpochEntry) -> bool:
        stopping = self.train.early_stopping
        if stopping is None:
            return False
        value = logs[stopping.metric]
        mode = metric_mode(stopping.metric)
        best, delta = self.best_value, stopping.min_delta
        improved = best is None or (value < best - delta if mode == "min" else value > best + delta)
        if improved:
            self.best_value, self.best_round, self.bad_rounds = value, int(logs["epoch"]), 0
            return False
        self.bad_rounds += 1
        return self.bad_rounds >= stopping.patience


def fit_gbdt(
    model: GBDTModel,
    data: TensorData,
    train: TrainSpec,
    problem: Problem,
    *,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Boost ``model`` on ``data`` (validating on its val split when present); the model
    keeps the best round's trees when early stopping is on."""
    spec = model.spec
    arrays = _Arrays.of(data, sample_weights(spec, data.y_train.numpy(), problem))
    stopping = train.early_stopping
    if stopping is not None and stopping.metric.startswith("val_") and arrays.x_val is None:
        raise SpecError("early stopping needs validation rows", field="data.split.val")
    y_var = None
    if arrays.y_val is not None and problem.task == "regression":
        y_var = float(np.var(arrays.y_val))
    rounds = _Rounds(train, problem, y_var, callbacks)
    for cb in callbacks:
        cb.on_train_start(spec.n_estimators, 0)
    boost = _boost_lightgbm if model.library == "lightgbm" else _boost_xgboost
    try:
        model.booster = boost(model, train, problem, rounds, arrays)
    except BaseException as exc:
        for cb in callbacks:
            cb.on_train_end({"epochs_run": len(rounds.history), "error": str(exc)})
        raise
    run = len(rounds.history)
    stopped = train.early_stopping is not None and run < spec.n_estimators
    keep = rounds.best_round if train.early_stopping is not None else None
    restore = train.early_stopping is not None and train.early_stopping.restore_best
    model.load_booster(_truncated(model, keep if restore else None))
    result = FitResult(
        history=rounds.history,
        epochs_run=run,
        best_epoch=keep,
        stopped_early=stopped,
        seconds=round(time.perf_counter() - rounds.started, 3),
        device="cpu",
    )
    summary: TrainSummary = {
        "epochs_run": run,
        "best_epoch": keep,
        "stopped_early": stopped,
        "seconds": result.seconds,
    }
    for cb in callbacks:
        cb.on_train_end(summary)
    return result


@dataclass(frozen=True)
class _Arrays:
    """The encoded splits as numpy, with the training rows' weights (or None)."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray | None
    x_val: np.ndarray | None
    y_val: np.ndarray | None

    @classmethod
    def of(cls, data: TensorData, weights: np.ndarray | None) -> _Arrays:
        has_val = data.x_val is not None and data.y_val is not None and len(data.x_val) > 0
        return cls(
            x=data.x_train.numpy(),
            y=data.y_train.numpy(),
            w=weights,
            x_val=data.x_val.numpy() if has_val and data.x_val is not None else None,
            y_val=data.y_val.numpy() if has_val and data.y_val is not None else None,
        )


def sample_weights(spec: GBDTSpec, y: np.ndarray, problem: Problem) -> np.ndarray | None:
    """Per-row weights from ``class_weight`` for encoded class indices ``y``: balanced
    (inverse class frequency) or the weight given per label (1.0 for labels not
    named); None without class weights. SpecError for a label not in the data."""
    weight, classes = spec.class_weight, problem.classes
    if weight is None or classes == 0:
        return None
    codes = y.astype(np.int64)
    if weight == "balanced":
        counts = np.bincount(codes, minlength=classes).astype(np.float64)
        per_class = len(y) / (classes * np.maximum(counts, 1.0))
    else:
        unknown = sorted(set(weight) - set(problem.labels))
        if unknown:
            raise SpecError(
                f"class_weight names {unknown}, not labels of the data {list(problem.labels)}",
                field="model.class_weight",
            )
        per_class = np.array([weight.get(label, 1.0) for label in problem.labels])
    return np.asarray(per_class[codes], dtype=np.float64)


def _truncated(model: GBDTModel, best_round: int | None) -> bytes:
    """The booster's bytes with only the first ``best_round`` rounds (all: None)."""
    booster = model.booster
    if best_round is None:
        return model.booster_bytes()
    if model.library == "lightgbm":
        return str(booster.model_to_string(num_iteration=best_round)).encode("utf-8")
    return bytes(booster[:best_round].save_raw(raw_format="json"))


# ---- LightGBM ------------------------------------------------------------------------


def _lightgbm_params(model: GBDTModel, train: TrainSpec, problem: Problem) -> dict[str, Any]:
    spec = model.spec
    params: dict[str, Any] = {
        "learning_rate": spec.learning_rate,
        "num_leaves": spec.num_leaves,
        "max_depth": spec.max_depth or -1,
        "min_data_in_leaf": spec.min_child_samples,
        "min_data_per_group": min(100, spec.min_child_samples),
        "feature_fraction": spec.colsample,
        "bagging_fraction": spec.subsample,
        "bagging_freq": 1 if spec.subsample < 1.0 else 0,
        "lambda_l1": train.regularization.l1,
        "lambda_l2": train.regularization.l2,
        "num_threads": model.threads,
        "seed": train.seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbose": -1,
    }
    if problem.task == "regression":
        params["objective"] = _REGRESSION_OBJECTIVES[problem.loss][0]
        params["metric"] = ["l2", "l1"]
    elif problem.classes == 2:
        params["objective"] = "binary"
        params["metric"] = ["binary_logloss", "binary_error"]
    else:
        params.update(objective="multiclass", num_class=problem.classes)
        params["metric"] = ["multi_logloss", "multi_error"]
    return params


def _boost_lightgbm(
    model: GBDTModel,
    train: TrainSpec,
    problem: Problem,
    rounds: _Rounds,
    a: _Arrays,
) -> Any:
    import lightgbm as lgb

    cats: Any = model.categorical or "auto"
    dtrain = lgb.Dataset(a.x, a.y, weight=a.w, categorical_feature=cats, free_raw_data=False)
    sets, names = [dtrain], ["train"]
    if a.x_val is not None:
        sets.append(lgb.Dataset(a.x_val, a.y_val, categorical_feature=cats, reference=dtrain))
        names.append("val")

    def after_round(env: Any) -> None:
        scores: dict[str, dict[str, float]] = {"train": {}, "val": {}}
        for set_name, metric, value, _ in env.evaluation_result_list:
            scores[set_name][_LGB_NAMES.get(metric, metric)] = float(value)
        if rounds.record(env.iteration + 1, scores["train"], scores["val"]):
            raise lgb.callback.EarlyStopException(env.iteration, [])

    after_round.order = 30  # type: ignore[attr-defined]  # lightgbm orders callbacks by it
    return lgb.train(
        _lightgbm_params(model, train, problem),
        dtrain,
        num_boost_round=model.spec.n_estimators,
        valid_sets=sets,
        valid_names=names,
        callbacks=[after_round],
    )


_LGB_NAMES = {
    "binary_logloss": "logloss",
    "multi_logloss": "logloss",
    "binary_error": "error",
    "multi_error": "error",
}


# ---- XGBoost -------------------------------------------------------------------------


def _xgboost_params(model: GBDTModel, train: TrainSpec, problem: Problem) -> dict[str, Any]:
    spec = model.spec
    params: dict[str, Any] = {
        "eta": spec.learning_rate,
        "max_depth": spec.max_depth or 6,
        "max_leaves": spec.num_leaves if "num_leaves" in spec.model_fields_set else 0,
        "subsample": spec.subsample,
        "colsample_bytree": spec.colsample,
        "alpha": train.regularization.l1,
        "lambda": train.regularization.l2,
        "nthread": model.threads,
        "seed": train.seed,
        "tree_method": "hist",
        "max_cat_to_onehot": 1,
    }
    if "min_child_samples" in spec.model_fields_set:
        params["min_child_weight"] = spec.min_child_samples  # a hessian sum in xgboost
    if problem.task == "regression":
        params["objective"] = _REGRESSION_OBJECTIVES[problem.loss][1]
        params["eval_metric"] = ["rmse", "mae"]
    elif problem.classes == 2:
        params.update(objective="binary:logistic", eval_metric=["logloss", "error"])
    else:
        params.update(objective="multi:softprob", num_class=problem.classes)
        params["eval_metric"] = ["mlogloss", "merror"]
    return params


def _boost_xgboost(
    model: GBDTModel,
    train: TrainSpec,
    problem: Problem,
    rounds: _Rounds,
    a: _Arrays,
) -> Any:
    import xgboost as xgb

    types = ["c" if i in model.categorical else "q" for i in range(a.x.shape[1])]
    dtrain = xgb.DMatrix(a.x, a.y, weight=a.w, feature_types=types, enable_categorical=True)
    evals = [(dtrain, "train")]
    if a.x_val is not None:
        dval = xgb.DMatrix(a.x_val, a.y_val, feature_types=types, enable_categorical=True)
        evals.append((dval, "val"))

    class AfterRound(xgb.callback.TrainingCallback):
        def after_iteration(self, _model: Any, epoch: int, evals_log: Any) -> bool:
            scores = {
                name: {_XGB_NAMES.get(m, m): float(v[-1]) for m, v in log.items()}
                for name, log in evals_log.items()
            }
            if problem.task == "regression":  # rmse -> l2, as lightgbm reports it
                for s in scores.values():
                    s["l2"] = s.pop("rmse") ** 2
            return rounds.record(epoch + 1, scores["train"], scores.get("val", {}))

    return xgb.train(
        _xgboost_params(model, train, problem),
        dtrain,
        num_boost_round=model.spec.n_estimators,
        evals=evals,
        callbacks=[AfterRound()],
        verbose_eval=False,
    )


_XGB_NAMES = {"mlogloss": "logloss", "merror": "error", "mae": "l1"}
