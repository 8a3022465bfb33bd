"""Row splits: holdout sizes, stratification, seeds, k-fold coverage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kiln.data.split import holdout, kfold
from kiln.errors import DataError
from kiln.spec import Split


def labels(n_per_class=(60, 30, 10)) -> pd.Series:
    return pd.Series(np.repeat(["a", "b", "c"], n_per_class))


def test_holdout_sizes_and_partition():
    y = pd.Series(np.arange(100) % 2)
    parts = holdout(y, Split(test=0.2, val=0.1, seed=0), stratify=False)
    assert (len(parts.train), len(parts.val), len(parts.test)) == (70, 10, 20)
    every = np.concatenate([parts.train, parts.val, parts.test])
    assert sorted(every.tolist()) == list(range(100))  # disjoint and complete
    for part in (parts.train, parts.val, parts.test):
        assert (np.diff(part) > 0).all()  # sorted positions


def test_holdout_without_val():
    parts = holdout(pd.Series(range(50)), Split(test=0.2, val=0.0), stratify=False)
    assert (len(parts.train), len(parts.val), len(parts.test)) == (40, 0, 10)


def test_stratified_holdout_keeps_class_proportions():
    y = labels()
    parts = holdout(y, Split(test=0.2, val=0.2, seed=3), stratify=True)
    for part, size in ((parts.test, 20), (parts.val, 20), (parts.train, 60)):
        counts = y.iloc[part].value_counts()
        assert len(part) == size
        expected = {"a": 0.6 * size, "b": 0.3 * size, "c": 0.1 * size}
        for cls, want in expected.items():
            assert counts[cls] == pytest.approx(want, abs=1)


def test_stratification_is_what_keeps_a_rare_class_proportional():
    # 10% of rows are "b": a stratified 10% test split always holds exactly one of them;
    # an unstratified one varies with the seed (the contrast shows stratify does the work).
    y = pd.Series(["a"] * 90 + ["b"] * 10)
    strat, plain = set(), set()
    for seed in range(10):
        split = Split(test=0.1, val=0.0, seed=seed)
        strat.add(int((y.iloc[holdout(y, split, stratify=True).test] == "b").sum()))
        plain.add(int((y.iloc[holdout(y, split, stratify=False).test] == "b").sum()))
    assert strat == {1}
    assert len(plain) > 1


def test_holdout_is_deterministic_for_a_seed():
    y = labels()
    a = holdout(y, Split(seed=7), stratify=True)
    b = holdout(y, Split(seed=7), stratify=True)
    c = holdout(y, Split(seed=8), stratify=True)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.test, c.test)


def test_stratify_with_a_single_member_class_errors():
    y = pd.Series(["a"] * 20 + ["b"] * 20 + ["lonely"])
    with pytest.raises(DataError) as info:
        holdout(y, Split(), stratify=True)
    assert info.value.field == "data.split.stratify"
    assert "'lonely' has 1 row" in info.value.message
    # Without stratification the same rows split fine.
    assert len(holdout(y, Split(), stratify=False).test) > 0


def test_too_few_rows_for_the_split():
    with pytest.raises(DataError, match="too few rows"):
        holdout(pd.Series([0, 1]), Split(test=0.5, val=0.3), stratify=False)
    # Stratified parts need a row of every class each.
    with pytest.raises(DataError, match="too few rows"):
        holdout(pd.Series(["a", "b", "a", "b"]), Split(), stratify=True)


@pytest.mark.parametrize("stratify", [True, False])
def test_kfold_covers_every_row_exactly_once(stratify):
    y = labels((20, 15, 10))
    seen = np.zeros(len(y), dtype=int)
    folds = list(kfold(y, 5, stratify=stratify, seed=0))
    assert len(folds) == 5
    for train, test in folds:
        assert set(train).isdisjoint(test)
        assert len(train) + len(test) == len(y)
        seen[test] += 1
        if stratify:
            assert y.iloc[test].value_counts().to_dict() == {"a": 4, "b": 3, "c": 2}
    assert (seen == 1).all()


def test_kfold_seeded():
    y = labels()
    first = [t.tolist() for _, t in kfold(y, 3, stratify=True, seed=1)]
    again = [t.tolist() for _, t in kfold(y, 3, stratify=True, seed=1)]
    other = [t.tolist() for _, t in kfold(y, 3, stratify=True, seed=2)]
    assert first == again
    assert first != other


def test_kfold_errors():
    y = labels((10, 10, 3))
    with pytest.raises(DataError, match="at least 2"):
        list(kfold(y, 1, stratify=False, seed=0))
    with pytest.raises(DataError, match="need at least 50 rows"):
        list(kfold(y, 50, stratify=False, seed=0))
    with pytest.raises(DataError, match="smallest class has 3 rows"):
        list(kfold(y, 4, stratify=True, seed=0))
