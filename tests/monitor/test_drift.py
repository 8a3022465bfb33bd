"""Drift maths: reference summaries and the population stability index."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kiln.monitor.drift import (
    OTHER,
    CategoricalReference,
    DriftWindow,
    Reference,
    psi,
    reference_stats,
)


def _frame(n: int, shift: float = 0.0, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "x": rng.normal(shift, 1.0, n),
            "colour": rng.choice(["red", "green", "blue"], n, p=[0.5, 0.3, 0.2]),
        }
    )


COLUMNS = [("x", "numeric"), ("colour", "categorical")]


def test_reference_bins_hold_tenths_of_the_training_rows() -> None:
    ref = reference_stats(_frame(5000), COLUMNS)
    x = ref["columns"]["x"]
    assert len(x["edges"]) == 9 and len(x["shares"]) == 10
    assert np.allclose(x["shares"], 0.1, atol=0.01)
    assert ref["columns"]["colour"]["shares"] == pytest.approx(
        {"red": 0.5, "green": 0.3, "blue": 0.2}, abs=0.03
    )
    assert ref["rows"] == 5000


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    ref = Reference.model_validate(reference_stats(_frame(5000), COLUMNS)).columns
    same = _frame(2000, seed=1)
    moved = _frame(2000, shift=1.0, seed=2)
    assert psi(ref["x"], same["x"]) < 0.02
    assert psi(ref["x"], moved["x"]) > 0.25
    # the textbook value for a one-sigma mean shift of a normal, binned in deciles, is ~0.9
    assert psi(ref["x"], moved["x"]) == pytest.approx(0.9, abs=0.25)


def test_psi_matches_the_formula_on_a_hand_example() -> None:
    ref = CategoricalReference(shares={"a": 0.5, "b": 0.5})
    live = pd.Series(["a"] * 80 + ["b"] * 20)
    expected = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert psi(ref, live) == pytest.approx(expected)


def test_unseen_categories_count_as_other() -> None:
    ref = Reference.model_validate(reference_stats(_frame(1000), COLUMNS)).columns["colour"]
    assert isinstance(ref, CategoricalReference)
    assert OTHER not in ref.shares  # all three seen in training
    live = pd.Series(["purple"] * 100)
    assert psi(ref, live) > 1.0


def test_empty_or_non_numeric_windows_give_no_value() -> None:
    ref = Reference.model_validate(reference_stats(_frame(100), COLUMNS)).columns
    assert psi(ref["x"], pd.Series([], dtype=float)) is None
    assert psi(ref["colour"], pd.Series([None, None])) is None


def test_the_reference_document_reads_back_as_its_typed_model() -> None:
    document = reference_stats(_frame(500), COLUMNS)
    reference = Reference.model_validate(document)
    assert reference.rows == 500
    assert reference.columns["x"].kind == "numeric"
    assert reference.model_dump() == document  # the JSON in kiln.json is unchanged


def test_window_flags_only_the_drifted_column_and_forgets_old_rows() -> None:
    reference = reference_stats(_frame(5000), COLUMNS)
    window = DriftWindow(reference, size=1000)
    window.add(_frame(1000, seed=3))
    report = window.report(threshold=0.2)
    assert report["rows"] == 1000 and report["drifted"] == []
    moved = _frame(1000, seed=4)
    moved["x"] += 2.0
    window.add(moved)  # pushes every earlier row out
    report = window.report(threshold=0.2)
    assert report["drifted"] == ["x"]
    assert report["columns"]["colour"]["drifted"] is False
    assert report["columns"]["x"]["psi"] > 0.2


def test_a_trained_bundle_carries_its_reference(make_spec) -> None:
    import kiln

    bundle = kiln.fit(make_spec())
    columns = bundle.meta.reference["columns"]
    assert set(columns) == {c.name for c in bundle.meta.input_schema}
    assert bundle.meta.reference["rows"] == bundle.meta.lineage.split.train
