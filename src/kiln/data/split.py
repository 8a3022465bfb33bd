"""Row splits: holdout (train/val/test) and k-fold, stratified when asked, seeded."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kiln.errors import DataError
from kiln.spec.data import Split


@dataclass(frozen=True)
class Holdout:
    """Row indices (positions) of each part."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def holdout(y: pd.Series, split: Split, stratify: bool) -> Holdout:
    """Split positions 0..N-1 into train/val/test with the spec's fractions."""
    n = len(y)
    idx = np.arange(n)
    labels = y.astype(str).to_numpy() if stratify else None
    _check_stratifiable(labels, split.test + split.val)
    rest, test = split_off(idx, split.test, labels, split.seed)
    if split.val > 0:
        val_of_rest = split.val / (1.0 - split.test)
        rest_labels = labels[rest] if labels is not None else None
        train, val = split_off(rest, val_of_rest, rest_labels, split.seed + 1)
    else:
        train, val = rest, idx[:0]
    if len(train) == 0:
        raise DataError(f"no rows left for training out of {n}", field="data.split")
    return Holdout(train=np.sort(train), val=np.sort(val), test=np.sort(test))


def split_off(
    idx: np.ndarray, fraction: float, labels: np.ndarray | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``idx`` into (rest, part) with ``fraction`` of them in ``part``.

    Stratified by ``labels`` when given; ``part`` gets at least one row per class.
    """
    from sklearn.model_selection import train_test_split

    if fraction <= 0:
        return idx, idx[:0]
    size = max(1, round(fraction * len(idx)))
    if labels is not None:
        size = max(size, len(np.unique(labels)))
    if size >= len(idx):
        raise DataError(f"too few rows ({len(idx)}) for a {fraction:.0%} split", field="data.split")
    a, b = train_test_split(idx, test_size=size, random_state=seed, stratify=labels)
    return np.asarray(a), np.asarray(b)


def _check_stratifiable(labels: np.ndarray | None, held_out: float) -> None:
    if labels is None or held_out <= 0:
        return
    values, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        rare = values[counts.argmin()]
        raise DataError(
            f"class {rare!r} has {counts.min()} row; a stratified split needs at least 2 per "
            "class (add rows or set data.split.stratify: false)",
            field="data.split.stratify",
        )


def kfold(
    y: pd.Series, folds: int, stratify: bool, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (train positions, test positions) for each of ``folds`` folds."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if folds < 2:
        raise DataError("folds must be at least 2", field="folds")
    if folds > len(y):
        raise DataError(f"{folds} folds need at least {folds} rows, have {len(y)}", field="folds")
    idx = np.arange(len(y))
    if stratify:
        labels = y.astype(str).to_numpy()
        counts = np.unique(labels, return_counts=True)[1]
        if counts.min() < folds:
            raise DataError(
                f"the smallest class has {counts.min()} rows, fewer than {folds} folds "
                "(use fewer folds or data.split.stratify: false)",
                field="folds",
            )
        yield from StratifiedKFold(folds, shuffle=True, random_state=seed).split(idx, labels)
    else:
        yield from KFold(folds, shuffle=True, random_state=seed).split(idx)
