"""Early stopping on a small validation split: smoothing the monitored value.

On a validation split of a few dozen rows the monitored value moves from epoch to
epoch by about as much as the model really changes, so the raw minimum is partly
luck and one lucky epoch can reset the patience count. With smoothing, early
stopping compares an exponential moving average (EMA) of the value instead:

    s_1 = v_1;  s_t = alpha * v_t + (1 - alpha) * s_(t-1)

The best epoch (whose weights are restored) is the one with the best ``s_t``, and
patience counts epochs without an improvement of ``s_t``. The EMA is logged in the
epoch's entry as ``<metric>_smoothed``, so the history records which rule ran and a
resumed run continues the average from its last checkpointed entry.

k-fold early stopping (``folds``) uses more rows to choose the epoch count: k models
are trained with the spec's settings on k folds of train+val, each stopping early on
its own fold; their per-epoch curves of the monitored metric are averaged
(:func:`mean_curve`) and the best epoch of the mean curve, with patience applied to
it (:func:`best_epoch_of`), is how long the final model trains on ALL of train+val,
without early stopping (:func:`train_kfold`). ``folds: auto`` does this for a
``val_*`` metric on fewer than :data:`SMALL_VAL_ROWS` validation rows; the default is
``none``: on the breast-cancer example (40 seeds) k-fold, smoothing and raw picking
score within one test row of each other, and k-fold costs about k+1 trainings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pandas as pd

from kiln.spec.spec import metric_mode
from kiln.spec.train import EarlyStopping
from kiln.train.checkpoint import EpochEntry

if TYPE_CHECKING:
    from kiln.spec.spec import Spec
    from kiln.train.callbacks import Callback
    from kiln.train.checkpoint import CheckpointStore
    from kiln.train.recipe import Table, Trained

SMALL_VAL_ROWS = 200
"""``smoothing: auto`` smooths when the validation split has fewer rows than this."""

AUTO_ALPHA = 0.3
"""The EMA weight of the newest epoch under ``auto`` (about a 5-epoch window)."""

AUTO_FOLDS = 5
"""``folds: auto`` chooses the epoch count on this many folds of a small split."""

Smoothing = Literal["auto", "none"] | float
"""The spec's ``train.early_stopping.smoothing``: auto, none, or an EMA weight in (0, 1]."""

Folds = Literal["auto", "none"] | int
"""The spec's ``train.early_stopping.folds``: auto, none, or a fold count (>= 2)."""


@dataclass(frozen=True)
class EpochChoice:
    """How k-fold early stopping chose the final fit's epoch count.

    ``mean_curve[t - 1]`` is the folds' mean ``metric`` after epoch ``t``;
    ``best_epoch`` (1-based) is the epoch count the final model trained for, and
    ``best_value`` the mean curve there (a cross-validated estimate). ``seconds`` is
    the time of the fold runs.
    """

    folds: int
    metric: str
    best_epoch: int
    best_value: float
    mean_curve: list[float]
    seconds: float
    by: str = "kfold"


def smoothing_factor(setting: Smoothing, metric: str, val_rows: int | None) -> float | None:
    """The EMA weight for ``metric``, or None to compare raw values.

    ``auto`` smooths only a validation metric (``val_*``) measured on fewer than
    :data:`SMALL_VAL_ROWS` rows; ``val_rows`` is None when there is no validation split.
    A float is used as given (1.0 is the same as no smoothing).
    """
    if setting == "none":
        return None
    if setting == "auto":
        small = val_rows is not None and 0 < val_rows < SMALL_VAL_ROWS
        return AUTO_ALPHA if small and metric.startswith("val_") else None
    return float(setting)


def fold_count(setting: Folds, metric: str, val_rows: int | None) -> int | None:
    """The folds to choose the epoch count on, or None to stop on the validation split.

    Only a validation metric (``val_*``) is chosen by folds; ``auto`` does so on a
    validation split of fewer than :data:`SMALL_VAL_ROWS` rows (``val_rows`` is None
    when there is none); an int is used for any split.
    """
    if setting == "none" or not metric.startswith("val_"):
        return None
    if setting == "auto":
        small = val_rows is not None and 0 < val_rows < SMALL_VAL_ROWS
        return AUTO_FOLDS if small else None
    return int(setting)


def smoothed_key(metric: str) -> str:
    """The epoch-log key the EMA of ``metric`` is recorded under."""
    return f"{metric}_smoothed"


def monitored_value(
    logs: EpochEntry, metric: str, history: list[EpochEntry], alpha: float | None
) -> float:
    """The value early stopping compares for this epoch's ``logs``.

    The raw ``logs[metric]`` when ``alpha`` is None; otherwise the EMA continued from
    the previous entry of ``history`` (the epochs before this one), which is also
    written into ``logs`` under :func:`smoothed_key`.
    """
    value = float(logs[metric])
    if alpha is None:
        return value
    key = smoothed_key(metric)
    previous = history[-1].get(key) if history else None
    ema = value if previous is None else alpha * value + (1.0 - alpha) * previous
    logs[key] = ema
    return ema


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """The per-epoch mean of the folds' ``curves`` (each one value per epoch run).

    A fold that stopped early holds its last value for the later epochs (it stopped
    because the metric had stalled), so the mean is defined up to the longest fold.
    """
    longest = max(len(c) for c in curves)
    padded = [[*c, *[c[-1]] * (longest - len(c))] for c in curves]
    return [sum(col) / len(col) for col in zip(*padded, strict=True)]


def best_epoch_of(curve: Sequence[float], mode: str, patience: int, min_delta: float) -> int:
    """The 1-based epoch early stopping picks on ``curve``, as the engine does: the
    best value so far (by ``min_delta``, ``mode`` min or max), scanning until
    ``patience`` epochs in a row bring no improvement."""
    best, best_t, bad = curve[0], 1, 0
    for t, value in enumerate(curve[1:], start=2):
        better = value < best - min_delta if mode == "min" else value > best + min_delta
        if better:
            best, best_t, bad = value, t, 0
        else:
            bad += 1
            if bad >= patience:
                break
    return best_t


def kfold_folds(spec: Spec, train: pd.DataFrame, val: pd.DataFrame | None) -> int | None:
    """The folds :func:`train_kfold` should use for ``spec``, or None for a plain fit.

    None without early stopping, with a plateau schedule (it steps on a validation
    metric the final fit has none of) or a schedule spread over ``epochs`` (cosine,
    linear, warmup: the final fit's shorter run would follow another learning-rate
    curve than the folds whose epoch it copies), or under ``auto`` when a class of
    train+val has fewer rows than folds (stratified folds need one per class per fold).
    """
    stopping = spec.train.early_stopping
    schedule = spec.train.lr_schedule
    if stopping is None or schedule.name in ("plateau", "cosine", "linear") or schedule.warmup:
        return None
    k = fold_count(stopping.folds, stopping.metric, len(val) if val is not None else None)
    if k is None or stopping.folds != "auto" or spec.task != "classification":
        return k
    target = spec.data.target
    labels = train[target] if val is None else pd.concat([train[target], val[target]])
    return k if int(labels.value_counts().min()) >= k else None


def train_kfold(
    spec: Spec,
    table: Table,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    folds: int,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoints: CheckpointStore | None = None,
    resume: bool = False,
) -> Trained:
    """k-fold early stopping: choose the epoch count on ``folds`` folds of train+val,
    then train on all of train+val for exactly that many epochs.

    The folds are split with ``data.split.seed`` (stratified for classification) and
    trained silently with the spec's settings and early stopping on their fold; the
    final fit has no validation split and no early stopping, and gets ``callbacks``,
    ``checkpoints`` and ``resume`` (the folds rerun on resume: they are deterministic,
    so the resumed fit trains for the same epochs). The result's ``epoch_choice``
    records the choice.
    """
    from kiln.data.split import kfold
    from kiln.train.recipe import train_frames  # recipe imports the engine, which imports us

    stopping = spec.train.early_stopping
    assert stopping is not None
    rows = train if val is None else pd.concat([train, val])
    _announce(callbacks, folds)
    started = time.perf_counter()
    fold_spec = _with_stopping(spec, stopping.model_copy(update={"folds": "none"}))
    target = rows[spec.data.target]
    stratify = spec.task == "classification"
    curves: list[list[float]] = []
    for fit_pos, stop_pos in kfold(target, folds, stratify, spec.data.split.seed):
        fold = train_frames(fold_spec, table, rows.iloc[fit_pos], rows.iloc[stop_pos])
        curves.append([float(e[stopping.metric]) for e in fold.result.history])
    curve = mean_curve(curves)
    mode = metric_mode(stopping.metric)
    best = best_epoch_of(curve, mode, stopping.patience, stopping.min_delta)
    choice = EpochChoice(
        folds=folds,
        metric=stopping.metric,
        best_epoch=best,
        best_value=curve[best - 1],
        mean_curve=curve,
        seconds=time.perf_counter() - started,
    )
    final = spec.model_copy(
        update={"train": spec.train.model_copy(update={"epochs": best, "early_stopping": None})}
    )
    trained = train_frames(
        final, table, rows, None, callbacks=callbacks, checkpoints=checkpoints, resume=resume
    )
    trained.result.epoch_choice = choice
    return trained


def _with_stopping(spec: Spec, stopping: EarlyStopping) -> Spec:
    """``spec`` with ``train.early_stopping`` replaced."""
    return spec.model_copy(
        update={"train": spec.train.model_copy(update={"early_stopping": stopping})}
    )


def _announce(callbacks: Sequence[Callback], folds: int) -> None:
    """One line on the console when a progress bar is shown (the fold runs are silent)."""
    from kiln.train.callbacks import RichProgress

    if any(isinstance(cb, RichProgress) for cb in callbacks):
        from rich.console import Console

        Console(stderr=True).print(f"choosing epochs on {folds} folds")
