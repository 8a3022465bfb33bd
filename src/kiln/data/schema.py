"""Column type inference: numeric, categorical, or free text (text is kept for later issues)."""

from __future__ import annotations

from typing import Literal

import pandas as pd
from pydantic import BaseModel

from kiln.errors import DataError, SpecError

ColumnKind = Literal["numeric", "categorical", "text", "image"]

# Share of parseable numbers above which a string column is numeric.
NUMERIC_SHARE = 0.9
# Object columns whose values average more than this many words read as free text.
_TEXT_MIN_WORDS = 4.0


class Column(BaseModel):
    """One input column as the model expects it."""

    name: str
    kind: ColumnKind


def infer_kind(series: pd.Series) -> ColumnKind:
    """Numeric dtypes (bool included) are numeric; strings are categorical or text."""
    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
        return "numeric"
    values = series.dropna().astype(str)
    if values.empty:
        return "categorical"
    # Mostly numbers with a few stray strings is a numeric column with bad cells, which
    # preprocessing then reports by row; not a category per distinct number.
    if pd.to_numeric(values, errors="coerce").notna().mean() >= NUMERIC_SHARE:
        return "numeric"
    words = values.map(lambda v: len(v.split())).mean()
    unique_ratio = values.nunique() / len(values)
    if words >= _TEXT_MIN_WORDS and unique_ratio > 0.5:
        return "text"
    return "categorical"


def select_features(frame: pd.DataFrame, target: str, features: list[str] | None) -> list[Column]:
    """The feature columns with their kinds, checked against the table.

    With ``features`` omitted every column but the target is used, except free text
    (text models come with the text model types). Naming a text column explicitly is
    a SpecError, since tabular models cannot use it.
    """
    if target not in frame.columns:
        raise DataError(
            f"target column {target!r} is not in the data; columns are {list(frame.columns)}",
            field="data.target",
        )
    if features is None:
        cols = [Column(name=c, kind=infer_kind(frame[c])) for c in frame.columns if c != target]
        cols = [c for c in cols if c.kind != "text"]
        if not cols:
            raise DataError("the data has no usable feature columns", field="data.features")
        return cols
    missing = [f for f in features if f not in frame.columns]
    if missing:
        raise DataError(
            f"feature column(s) {missing} not in the data; columns are {list(frame.columns)}",
            field="data.features",
        )
    cols = [Column(name=f, kind=infer_kind(frame[f])) for f in features]
    text = [c.name for c in cols if c.kind == "text"]
    if text:
        raise SpecError(
            f"column(s) {text} hold free text, which linear/mlp/cnn models cannot use",
            field="data.features",
        )
    return cols
