"""Encoders: the all-numeric batch path equals the column pass; plain JSON rows to arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kiln.data.encoders import TabularEncoder, numeric_rows
from kiln.data.preprocess_fit import fit_features
from kiln.data.schema import Column
from kiln.errors import DataError
from kiln.spec import Preprocessing


def numeric_table(rng: np.random.Generator, rows: int, columns: int) -> pd.DataFrame:
    """Random numbers of mixed scales and dtypes, with missing values (NaN) sprinkled."""
    values = rng.normal(size=(rows, columns)) * rng.uniform(0.1, 100, size=columns)
    values[rng.random(size=values.shape) < 0.1] = np.nan
    frame = pd.DataFrame(values, columns=[f"x{i}" for i in range(columns)])
    frame["x1"] = frame["x1"].astype(np.float32)
    frame["x2"] = rng.integers(-50, 50, size=rows)  # an int column: no missing values
    return frame


def fit_numeric(frame: pd.DataFrame, **options) -> TabularEncoder:
    columns = [Column(name=str(c), kind="numeric") for c in frame.columns]
    return TabularEncoder(fit_features(frame, columns, Preprocessing(**options)))


@pytest.mark.parametrize(
    "options",
    [
        {"missing": "mean"},
        {"missing": "median", "scale": "minmax"},
        {"missing": "mode", "scale": "none"},
    ],
)
def test_the_batch_encoding_equals_the_column_pass_on_random_data(options):
    rng = np.random.default_rng(7)
    encoder = fit_numeric(numeric_table(rng, 200, 9), **options)
    assert encoder.batch is not None and encoder.columns == [f"x{i}" for i in range(9)]
    for seed in range(5):
        probe = numeric_table(np.random.default_rng(seed), 31, 9)
        assert probe.isna().any().any()  # imputation is exercised
        batch = encoder.batch.encode(probe.to_numpy().astype(np.float64))
        assert batch is not None  # the batch path itself, not a fallback, is compared
        by_column = encoder.encode_columns(probe)
        np.testing.assert_array_equal(batch, by_column)
        assert by_column.dtype == np.float32
        np.testing.assert_array_equal(encoder.encode(probe), by_column)  # bit for bit
        np.testing.assert_array_equal(encoder.encode_matrix(probe.to_numpy()), by_column)
        shuffled = probe[probe.columns[::-1]].assign(extra="ignored")
        np.testing.assert_array_equal(encoder.encode(shuffled), by_column)


def test_the_batch_encoding_refuses_what_the_column_pass_refuses():
    rng = np.random.default_rng(3)
    encoder = fit_numeric(numeric_table(rng, 50, 4).fillna(0.0), missing="drop")
    assert encoder.batch is not None
    probe = numeric_table(rng, 6, 4).fillna(1.0)
    probe.index = [10, 11, 12, 13, 14, 15]  # rows keep the table's numbers in messages
    probe.loc[13, "x3"] = np.nan
    assert encoder.batch.encode(probe.to_numpy().astype(np.float64)) is None
    with pytest.raises(DataError) as info:
        encoder.encode(probe)
    assert info.value.field == "x3"
    assert "row 13: missing value (missing: drop rejects it)" in info.value.message
    with pytest.raises(DataError, match=r"'x3', row 3: missing value"):
        encoder.encode_matrix(probe.to_numpy())  # a matrix's rows count from 0
    probe.loc[15, "x0"] = np.inf  # an earlier column is reported first
    with pytest.raises(DataError, match=r"'x0', row 15: value is infinite"):
        encoder.encode(probe)


def test_numeric_rows_takes_plain_numbers_only():
    rows = [{"a": 1, "b": 2.5, "extra": "x"}, {"b": float("nan"), "a": -3}]
    matrix = numeric_rows(rows, ["a", "b"])
    assert matrix is not None and matrix.dtype == np.float64
    np.testing.assert_array_equal(matrix, [[1.0, 2.5], [-3.0, np.nan]])
    np.testing.assert_array_equal(numeric_rows([[1, 2], (3, 4.0)], range(2)), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(numeric_rows([{"a": 2}, {"a": 3.5}], ["a"]), [[2.0], [3.5]])
    assert numeric_rows([{"a": 1}], ["a", "b"]) is None  # a missing column
    assert numeric_rows([{"a": True, "b": 1}], ["a", "b"]) is None  # bools are not numbers
    assert numeric_rows([{"a": "1", "b": 1}], ["a", "b"]) is None
    assert numeric_rows([{"a": None, "b": 1}], ["a", "b"]) is None
    assert numeric_rows([[1]], range(2)) is None
    assert numeric_rows([], ["a"]) is None
