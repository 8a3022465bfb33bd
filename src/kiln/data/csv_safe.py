"""Writing tables as CSV that spreadsheets open safely (no formula injection).

A spreadsheet runs a cell that starts with ``=``, ``+``, ``-`` or ``@`` (and, per
OWASP, a tab or a carriage return) as a formula: a prediction file whose rows or labels
came from users could then run ``=HYPERLINK(...)`` or ``=cmd|...`` on the machine of
whoever opens it. Every CSV kiln writes goes through :func:`write_csv`, which prefixes
such text cells (and column names) with ``'``, the mark spreadsheets read as "text,
not a formula", and then hides. Numbers are never touched: a numeric column keeps
``-1.5``, and a text cell that is just a number (``"-1.5"``, ``"+3e-2"``) stays as it
is, since a spreadsheet reads it as that number and nothing more.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kiln.errors import SpecError

# what makes a spreadsheet evaluate a cell (OWASP "CSV Injection")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
SEPARATORS = {".csv": ",", ".tsv": "\t"}


def neutralise_cell(value: Any) -> Any:
    """``value`` with a leading ``'`` when it is text a spreadsheet would run."""
    if (
        isinstance(value, str)
        and value.startswith(FORMULA_START)
        and not _PLAIN_NUMBER.fullmatch(value)
    ):
        return "'" + value
    return value


def neutralise(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` whose text cells (object, string and categorical columns) and
    column names are neutralised; numeric, boolean and datetime columns stay as they are."""
    out = frame.copy()
    for column in out.columns:
        dtype = out[column].dtype
        if pd.api.types.is_object_dtype(dtype) or isinstance(
            dtype, pd.StringDtype | pd.CategoricalDtype
        ):
            out[column] = out[column].astype(object).map(neutralise_cell)
    out.columns = [neutralise_cell(str(c)) for c in out.columns]
    return out


def separator(path: str | Path) -> str:
    """The separator a file named ``path`` gets (``,`` for .csv, a tab for .tsv); any
    other suffix is a SpecError naming ``out`` (check it before computing what to write)."""
    sep = SEPARATORS.get(Path(path).suffix.lower())
    if sep is None:
        raise SpecError(f"{Path(path).name}: write a .csv or .tsv file", field="out")
    return sep


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` to ``path`` (``.csv``, or ``.tsv`` tab-separated), neutralised,
    without the index, lines ending in CRLF; returns the path. Any other suffix is a
    SpecError."""
    out = Path(path)
    sep = separator(out)
    # RFC 4180's CRLF: the writer then quotes a cell holding a lone carriage return,
    # which a reader (and a spreadsheet) would otherwise take for the end of the row
    neutralise(frame).to_csv(out, sep=sep, index=False, lineterminator="\r\n")
    return out


def predictions_table(
    rows: pd.DataFrame,
    predictions: Sequence[Any],
    probabilities: Sequence[Sequence[float]] | None,
) -> pd.DataFrame:
    """The input ``rows`` with a ``prediction`` column (and ``probability``, that of the
    predicted class, for a classifier) appended: what ``--out`` writes."""
    out = rows.reset_index(drop=True).copy()
    out["prediction"] = list(predictions)
    if probabilities is not None:
        out["probability"] = [max(p) for p in probabilities]
    return out
