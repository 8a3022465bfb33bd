"""``model.type: auto``: a short, honest model selection for tables.

Each candidate (``linear``, ``mlp``, ``gbdt`` by default) is trained with its own
defaults and scored by the primary validation metric: accuracy for classification
(log loss breaks ties), r2 for regression. With fewer than ``model.small_rows``
training rows the candidates are compared by k-fold cross-validation (``model.folds``)
over the non-test rows (training and validation rows together; each fold carves its
early-stopping rows out of its own training part); otherwise on the holdout
validation split. The test split is never seen. The winner's spec is then trained
by :func:`kiln.fit` like any other spec (only the winner checkpoints: a resumed fit
selects again, with the same outcome for the same seed, and resumes the winner).

Candidate defaults, each a fair contender:

- ``linear`` and ``mlp`` (the model type's defaults) train with the spec's own
  ``train:`` section; what it leaves unset becomes ``epochs: 200`` with
  ``early_stopping: {metric: val_loss, patience: 10}`` (best epoch restored) and
  ``batch_size`` 32 (256 from 10,000 training rows on); ``linear`` also gets a light
  ridge penalty (``regularization: {l2: 0.001}``), as scikit-learn's logistic
  regression has by default: without one, a separable table drives the weights up.
- ``gbdt`` gets the boosting defaults: ``GBDTSpec()`` with early stopping on the
  validation loss after 50 rounds without improvement (best round kept), the spec's
  seed and, for regression, its loss; the neural ``train:`` settings do not apply.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from pydantic import JsonValue

from kiln.data.split import kfold, split_off
from kiln.errors import DataError, SpecError
from kiln.evaluate.metrics import Metrics, metric_value
from kiln.spec.load import load_spec
from kiln.spec.model import AutoCandidate, AutoSpec
from kiln.spec.spec import Spec
from kiln.spec.train import REGRESSION_LOSSES
from kiln.train.callbacks import Callback
from kiln.train.checkpoint import CheckpointStore
from kiln.train.recipe import Table, Trained, score_frame, train_frames

if TYPE_CHECKING:
    from rich.status import Status

Method = Literal["kfold", "holdout"]

NEURAL_EPOCHS = 200
NEURAL_PATIENCE = 10
LARGE_TABLE_ROWS = 10_000  # from here on the neural candidates batch 256 rows
LINEAR_L2 = 1e-3  # x sum(w^2), added to the mean loss
BOOSTING_PATIENCE = 50


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's validation score: the holdout value, or the mean over folds
    with their sample ``std``; ``log_loss`` (classification) breaks ties."""

    type: AutoCandidate
    score: float
    std: float | None
    log_loss: float | None
    seconds: float


@dataclass(frozen=True)
class Selection:
    """The outcome of a selection: every candidate's score and the winner's spec."""

    metric: Literal["accuracy", "r2"]
    method: Method
    folds: int | None
    candidates: tuple[CandidateScore, ...]
    winner: AutoCandidate
    spec: Spec  # the winner's spec: what kiln.fit trains and the bundle's model


class CandidateCallback(Callback):
    """A callback that also hears about the candidates of a selection (progress);
    the candidates' own epochs are not reported to any callback."""

    def on_candidate_start(self, kind: AutoCandidate, index: int, total: int) -> None:
        """Before candidate ``index`` (0-based) of ``total`` is trained."""

    def on_candidate_end(self, score: CandidateScore) -> None:
        """After the candidate is scored."""

    def on_selection_end(self) -> None:
        """After the last candidate, or when one failed."""


class CandidateLines(CandidateCallback):
    """One Rich line per candidate on stderr (a spinner while it trains)."""

    def __init__(self, metric: str) -> None:
        from rich.console import Console

        self.metric = metric
        self._console = Console(stderr=True)
        self._status: Status | None = None
        self._label = ""

    def on_candidate_start(self, kind: AutoCandidate, index: int, total: int) -> None:
        self._label = f"candidate {index + 1}/{total} {kind}"
        status = self._console.status(f"training {self._label}")
        status.start()
        self._status = status

    def on_candidate_end(self, score: CandidateScore) -> None:
        self.on_selection_end()
        spread = f" ± {score.std:.4f}" if score.std is not None else ""
        self._console.print(
            f"{self._label}: {self.metric} {score.score:.4f}{spread} ({score.seconds:.1f}s)",
            highlight=False,
        )

    def on_selection_end(self) -> None:
        if self._status is not None:
            self._status.stop()
        self._status = None


class _StopsOnly(Callback):
    """Forwards only the per-batch hook (where a cancelled job raises) to the fit's
    callbacks: a candidate's epochs are no part of the trained model's history."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_batch_end(self) -> None:
        for cb in self.callbacks:
            cb.on_batch_end()


def select_model(
    spec: Spec,
    table: Table,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame | None,
    callbacks: Sequence[Callback] = (),
) -> Selection:
    """Train and score every candidate of the auto spec ``spec`` on the non-test rows
    ``train_df``/``val_df``; the winner has the best score (ties: the lower log loss,
    then the earlier candidate). SpecError without a validation split (early stopping
    and the holdout comparison need one)."""
    auto = _auto(spec)
    if val_df is None or not len(val_df):
        raise SpecError(
            "model.type auto needs validation rows (data.split.val > 0): the candidates "
            "stop early on them and, on larger tables, are compared on them",
            field="data.split.val",
        )
    kinds = tuple(auto.candidates)
    method: Method = "kfold" if len(train_df) < auto.small_rows else "holdout"
    stop = _StopsOnly(callbacks)
    watchers = [cb for cb in callbacks if isinstance(cb, CandidateCallback)]
    scores: list[CandidateScore] = []
    try:
        for i, kind in enumerate(kinds):
            for w in watchers:
                w.on_candidate_start(kind, i, len(kinds))
            cand = candidate_spec(spec, kind, len(train_df))
            started = time.perf_counter()
            if method == "kfold":
                pool = pd.concat([train_df, val_df])
                folds = _kfold_metrics(cand, table, pool, auto.folds, stop)
            else:
                folds = [_holdout_metrics(cand, table, train_df, val_df, stop)]
            scores.append(_summary(kind, folds, spec.task, time.perf_counter() - started))
            for w in watchers:
                w.on_candidate_end(scores[-1])
    finally:
        for w in watchers:
            w.on_selection_end()
    best = max(range(len(scores)), key=lambda j: (_rank(scores[j]), -j))
    winner = scores[best].type
    return Selection(
        metric=primary_metric(spec.task),
        method=method,
        folds=auto.folds if method == "kfold" else None,
        candidates=tuple(scores),
        winner=winner,
        spec=candidate_spec(spec, winner, len(train_df)),
    )


def train_selected(
    spec: Spec,
    table: Table,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame | None,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoints: CheckpointStore | None = None,
    resume: bool = False,
) -> tuple[Trained, Selection]:
    """Select the model (:func:`select_model`), then train the winner on ``train_df``
    (validating on ``val_df``) with ``callbacks`` and ``checkpoints`` as kiln.fit
    trains any spec. The candidates themselves stop early on their validation rows
    (never by k-fold early stopping, which would nest folds in folds)."""
    selection = select_model(spec, table, train_df, val_df, callbacks)
    trained = train_frames(
        selection.spec,
        table,
        train_df,
        val_df,
        callbacks=callbacks,
        checkpoints=checkpoints,
        resume=resume,
        kfold_epochs=True,  # as kiln.fit trains any spec (k-fold early stopping when due)
    )
    return trained, selection


def primary_metric(task: str) -> Literal["accuracy", "r2"]:
    """The metric candidates are compared by."""
    return "accuracy" if task == "classification" else "r2"


def candidate_spec(spec: Spec, kind: AutoCandidate, train_rows: int) -> Spec:
    """The auto spec ``spec`` with candidate ``kind``'s model and training defaults
    (see the module docstring); ``train_rows`` sizes the neural batches."""
    # Only what the user wrote: a spec's defaults depend on what is set (trees default
    # to native preprocessing only where data.preprocessing leaves it unset).
    doc = spec.model_dump(mode="json", exclude_unset=True)
    doc["model"] = {"type": kind}
    user_train = doc.get("train")
    given: dict[str, JsonValue] = dict(user_train) if isinstance(user_train, dict) else {}
    if kind == "gbdt":
        doc["train"] = _boosting_train(spec, given)
    else:
        given.setdefault("epochs", NEURAL_EPOCHS)
        given.setdefault("early_stopping", {"metric": "val_loss", "patience": NEURAL_PATIENCE})
        given.setdefault("batch_size", 256 if train_rows >= LARGE_TABLE_ROWS else 32)
        if kind == "linear":
            given.setdefault("regularization", {"l2": LINEAR_L2})
        doc["train"] = given
    return load_spec(doc)


def _boosting_train(spec: Spec, given: dict[str, JsonValue]) -> dict[str, JsonValue]:
    """The gbdt candidate's ``train:``: boosting defaults; the seed, device and a
    regression loss are the spec's."""
    out: dict[str, JsonValue] = {
        "early_stopping": {"metric": "val_loss", "patience": BOOSTING_PATIENCE},
    }
    for key in ("seed", "device"):
        if key in given:
            out[key] = given[key]
    if spec.train.loss in REGRESSION_LOSSES:
        out["loss"] = spec.train.loss
    return out


def _auto(spec: Spec) -> AutoSpec:
    if not isinstance(spec.model, AutoSpec):
        raise SpecError(f"not an auto spec (model.type {spec.model.type})", field="model.type")
    return spec.model


def _holdout_metrics(
    cand: Spec, table: Table, train_df: pd.DataFrame, val_df: pd.DataFrame, stop: Callback
) -> Metrics:
    """Metrics of ``cand`` trained on ``train_df`` (stopping early on ``val_df``) on
    ``val_df``."""
    trained = train_frames(cand, table, train_df, val_df, callbacks=[stop])
    return score_frame(trained.model, trained.preprocessor, val_df, cand.data.target)


def _kfold_metrics(
    cand: Spec, table: Table, pool: pd.DataFrame, folds: int, stop: Callback
) -> list[Metrics]:
    """Metrics of ``cand`` on each held-out fold of ``pool`` (the non-test rows); each
    fold's early-stopping rows come out of its own training part, in the proportion
    the holdout split gives validation rows to training rows."""
    split = cand.data.split
    y = pool[cand.data.target]
    stratify = cand.task == "classification" and split.stratify
    val_share = split.val / (1.0 - split.test)
    results: list[Metrics] = []
    for train_pos, held_pos in _folds(y, folds, stratify, split.seed):
        labels = y.iloc[train_pos].astype(str).to_numpy() if stratify else None
        fit_pos, stop_pos = split_off(np.asarray(train_pos), val_share, labels, split.seed + 1)
        trained = train_frames(
            cand,
            table,
            pool.iloc[np.sort(fit_pos)],
            pool.iloc[np.sort(stop_pos)],
            callbacks=[stop],
        )
        held = pool.iloc[held_pos]
        results.append(score_frame(trained.model, trained.preprocessor, held, cand.data.target))
    return results


def _folds(
    y: pd.Series, folds: int, stratify: bool, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The k folds; errors name ``model.folds`` (the spec's key for k)."""
    try:
        return list(kfold(y, folds, stratify, seed))
    except DataError as exc:
        raise DataError(exc.message, field="model.folds") from None


def _summary(
    kind: AutoCandidate, folds: list[Metrics], task: str, seconds: float
) -> CandidateScore:
    """The candidate's score: the mean (and, over several folds, sample std) of the
    primary metric, and the mean log loss for classification."""
    values = [metric_value(m, primary_metric(task)) for m in folds]
    losses = [m["log_loss"] for m in folds if "log_loss" in m]
    return CandidateScore(
        type=kind,
        score=statistics.fmean(values),
        std=statistics.stdev(values) if len(values) > 1 else None,
        log_loss=statistics.fmean(losses) if losses and len(losses) == len(folds) else None,
        seconds=round(seconds, 3),
    )


def _rank(score: CandidateScore) -> tuple[float, float]:
    """Larger is better: the score, then the negated log loss (rounded, so that
    float noise in equal scores does not decide)."""
    tie = -score.log_loss if score.log_loss is not None else 0.0
    return round(score.score, 9), round(tie, 9)
