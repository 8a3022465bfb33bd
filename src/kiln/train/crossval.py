"""k-fold cross-validation: train on k-1 folds, score on the held-out fold, k times.

Each fold fits its own preprocessing on its own training rows. When the spec has a
validation fraction, it is carved out of each fold's training rows (for early
stopping), never out of the held-out fold. For ``model.type: auto`` the whole
selection runs inside each fold (nested: the held-out fold never takes part in it),
and each fold's metrics name the model it chose (``selected``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np

from kiln.data.split import kfold, split_off
from kiln.evaluate.metrics import (
    SCALAR_CLASSIFICATION,
    SCALAR_REGRESSION,
    Metrics,
    metric_value,
)
from kiln.spec.load import Document, load_spec
from kiln.spec.spec import Spec
from kiln.train.callbacks import Callback
from kiln.train.recipe import load_table, score_frame, train_frames


class CrossValDocument(TypedDict):
    """:class:`CrossValResult` as JSON: a crossval job's result, ``kiln crossval --json``."""

    folds: list[Metrics]
    mean: dict[str, float]
    std: dict[str, float]
    k: int


@dataclass
class CrossValResult:
    """Per-fold metrics (each with its ``epochs_run``) and their mean and (sample)
    standard deviation."""

    folds: list[Metrics]
    mean: dict[str, float]
    std: dict[str, float]

    def to_dict(self) -> CrossValDocument:
        return {"folds": self.folds, "mean": self.mean, "std": self.std, "k": len(self.folds)}


def crossval(
    spec: Spec | Document | str,
    folds: int = 5,
    *,
    on_fold: Callable[[int, Metrics], None] | None = None,
    callbacks: Callable[[int], Sequence[Callback]] | None = None,
    data_root: Path | None = None,
) -> CrossValResult:
    """Run k-fold cross-validation of ``spec``; ``on_fold(i, metrics)`` reports progress.

    ``data_root`` (a server's dataset folder) confines image paths to it.
    """
    spec = load_spec(spec)
    table = load_table(spec, data_root=data_root)
    target = spec.data.target
    y = table.frame[target]
    stratify = spec.task == "classification" and spec.data.split.stratify
    results: list[Metrics] = []
    for i, (train_idx, test_idx) in enumerate(kfold(y, folds, stratify, spec.data.split.seed)):
        val_df = None
        train_pos = np.asarray(train_idx)
        if spec.data.split.val > 0:
            strat = y.iloc[train_pos].astype(str).to_numpy() if stratify else None
            train_pos, val_pos = split_off(
                train_pos, spec.data.split.val, strat, spec.data.split.seed + 1
            )
            val_df = table.frame.iloc[np.sort(val_pos)]
        train_df = table.frame.iloc[np.sort(train_pos)]
        test_df = table.frame.iloc[test_idx]
        fold_callbacks = callbacks(i) if callbacks else ()
        selected = None
        if spec.model.type == "auto":
            from kiln.train.auto import train_selected

            trained, selection = train_selected(
                spec, table, train_df, val_df, callbacks=fold_callbacks
            )
            selected = selection.winner
        else:
            trained = train_frames(spec, table, train_df, val_df, callbacks=fold_callbacks)
        metrics = score_frame(trained.model, trained.preprocessor, test_df, target)
        metrics["epochs_run"] = trained.result.epochs_run
        if selected is not None:
            metrics["selected"] = selected
        results.append(metrics)
        if on_fold is not None:
            on_fold(i, metrics)
    return summarize(results, spec.task)


def summarize(results: list[Metrics], task: str) -> CrossValResult:
    """Mean and sample std of each scalar metric over folds (present in every fold)."""
    names = SCALAR_CLASSIFICATION if task == "classification" else SCALAR_REGRESSION
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for name in names:
        values = [metric_value(r, name) for r in results if name in r]
        if len(values) != len(results):
            continue
        mean[name] = statistics.fmean(values)
        std[name] = statistics.stdev(values) if len(values) > 1 else 0.0
    return CrossValResult(folds=results, mean=mean, std=std)
