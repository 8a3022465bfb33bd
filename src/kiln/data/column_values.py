"""Raw column values as checked numbers and JSON scalars, for fitting and encoding.

A value that cannot be used is a DataError naming the column and the row, the row
given by the table's own label (rows keep their number through splits, so a message
points at the row the user can find).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kiln.data.preprocess_state import JSONScalar
from kiln.errors import DataError


def numeric_column(series: pd.Series, name: str) -> np.ndarray:
    """Column as float64; a value that is present but not a number is a DataError."""
    if pd.api.types.is_bool_dtype(series):
        return series.astype(np.float64).to_numpy()
    coerced = pd.to_numeric(series, errors="coerce")
    bad = coerced.isna().to_numpy() & series.notna().to_numpy()
    if bad.any():
        row = first_row(series, bad)
        raise DataError(
            f"column {name!r}, row {row}: {series.loc[row]!r} is not a number", field=name
        )
    return coerced.to_numpy(dtype=np.float64, na_value=np.nan)


def first_row(series: pd.Series, mask: np.ndarray) -> Any:
    """The table's label of the first row where ``mask`` is set."""
    label = series.index[int(np.flatnonzero(mask)[0])]
    return label.item() if isinstance(label, np.generic) else label


def check_finite(values: np.ndarray, name: str, index: pd.Index | None = None) -> None:
    """DataError at the first infinite value; rows are ``index`` labels, else positions."""
    inf = np.isinf(values)
    if inf.any():
        pos = int(np.flatnonzero(inf)[0])
        row = index[pos] if index is not None else pos
        raise DataError(f"column {name!r}, row {row}: value is infinite", field=name)


def native(value: Any) -> JSONScalar:
    """A value as a plain JSON scalar: numpy scalars unwrapped, integral floats as ints."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value  # type: ignore[no-any-return]


def category(value: Any) -> str:
    """A category's name: 1, 1.0 and "1" are the same category (CSV readers disagree)."""
    return str(native(value))
