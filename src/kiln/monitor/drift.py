"""Input drift: how far live inputs have moved from the data a model was trained on.

At training time each input column is summarised (the *reference*): numeric columns
by ten quantile bins of the training split, categorical ones by the frequencies of
their categories. A deployment keeps a rolling window of the rows it served and
compares it with the reference by the population stability index,

    PSI = sum over bins of (live - ref) * ln(live / ref),

where ``live`` and ``ref`` are the shares of rows in each bin (a small floor keeps
empty bins finite). Rules of thumb: below 0.1 no shift, 0.1-0.25 a moderate one, above
0.25 a major one; kiln flags a column past ``threshold`` (default 0.2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, JsonValue

BINS = 10
TOP_CATEGORIES = 50
OTHER = "__other__"
FLOOR = 1e-4  # the share an empty bin counts as, so ln() stays finite


class NumericReference(BaseModel):
    """A numeric column: the shares of the training rows in the bins ``edges`` cut."""

    kind: Literal["numeric"] = "numeric"
    edges: list[float]  # inner edges (ascending): len(edges) + 1 bins
    shares: list[float]


class CategoricalReference(BaseModel):
    """A categorical column: the share of each top category (the rest: :data:`OTHER`)."""

    kind: Literal["categorical"] = "categorical"
    shares: dict[str, float]


ColumnReference = Annotated[NumericReference | CategoricalReference, Field(discriminator="kind")]


class Reference(BaseModel):
    """The reference statistics of a model's training inputs, as its bundle keeps them
    (the manifest's ``reference``, a JSON document: ``{"columns": {...}, "rows": n}``)."""

    columns: dict[str, ColumnReference] = {}
    rows: int = 0


def reference_stats(frame: pd.DataFrame, columns: list[tuple[str, str]]) -> dict[str, JsonValue]:
    """Per-column summaries of training inputs, as the manifest's JSON document
    (:class:`Reference`: ``{"columns": {name: {...}}, "rows": n}``)."""
    out: dict[str, NumericReference | CategoricalReference] = {}
    for name, kind in columns:
        if name not in frame.columns:
            continue
        values = frame[name]
        if kind == "numeric":
            numbers = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
            if numbers.size == 0:
                continue
            # inner edges at the deciles; duplicates merge (a column with few values)
            edges = np.unique(np.quantile(numbers, np.linspace(0, 1, BINS + 1)[1:-1]))
            shares = _shares_numeric(numbers, edges)
            out[name] = NumericReference(edges=edges.tolist(), shares=shares.tolist())
        elif kind == "categorical":
            text = values.dropna().astype(str)
            if text.empty:
                continue
            counts = text.value_counts()
            top = counts.iloc[:TOP_CATEGORIES]
            categories = {str(k): float(v) / len(text) for k, v in top.items()}
            rest = 1.0 - sum(categories.values())
            if rest > 0:
                categories[OTHER] = rest
            out[name] = CategoricalReference(shares=categories)
    return Reference(columns=out, rows=len(frame)).model_dump()


def _shares_numeric(numbers: np.ndarray, edges: np.ndarray) -> np.ndarray:
    bins = np.searchsorted(edges, numbers, side="right")  # 0 .. len(edges)
    counts = np.bincount(bins, minlength=len(edges) + 1).astype(float)
    return counts / max(1, len(numbers))


def psi(reference: NumericReference | CategoricalReference, values: pd.Series) -> float | None:
    """The PSI of ``values`` against one column's reference; None without data."""
    if isinstance(reference, NumericReference):
        numbers = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
        if numbers.size == 0:
            return None
        expected = np.asarray(reference.shares, dtype=float)
        actual = _shares_numeric(numbers, np.asarray(reference.edges, dtype=float))
    else:
        text = values.dropna().astype(str)
        if text.empty:
            return None
        known = reference.shares
        counts = text.map(lambda v: v if v in known else OTHER).value_counts()
        keys = sorted(set(known) | set(counts.index))
        expected = np.array([known.get(k, 0.0) for k in keys])
        actual = np.array([counts.get(k, 0) for k in keys], dtype=float) / len(text)
    expected = np.maximum(expected, FLOOR)
    actual = np.maximum(actual, FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


class DriftWindow:
    """The last ``size`` rows a deployment served, and their drift from a reference
    (a :class:`Reference`, or the manifest's JSON document of one)."""

    def __init__(self, reference: Reference | Mapping[str, Any], size: int = 1000) -> None:
        if not isinstance(reference, Reference):
            reference = Reference.model_validate(reference)
        self.reference = reference.columns
        self.size = size
        self.rows = pd.DataFrame(columns=list(self.reference))  # the newest ``size`` rows

    def add(self, frame: pd.DataFrame) -> None:
        names = [c for c in self.reference if c in frame.columns]
        parts = [self.rows, frame[names]] if len(self.rows) else [frame[names]]
        self.rows = pd.concat(parts, ignore_index=True).tail(self.size)

    def report(self, threshold: float) -> dict[str, Any]:
        """``{rows, threshold, columns: {name: {psi, drifted}}, drifted: [names]}``."""
        frame = self.rows
        columns: dict[str, ColumnDrift] = {}
        for name, ref in self.reference.items():
            value = psi(ref, frame[name]) if name in frame.columns else None
            columns[name] = ColumnDrift(
                psi=None if value is None or math.isnan(value) else round(value, 6),
                drifted=value is not None and value > threshold,
            )
        return {
            "rows": len(frame),
            "threshold": threshold,
            "columns": {name: c.model_dump() for name, c in columns.items()},
            "drifted": sorted(n for n, c in columns.items() if c.drifted),
        }


class ColumnDrift(BaseModel):
    """One column's drift: its PSI (None: no data) and whether it is past the threshold."""

    psi: float | None
    drifted: bool
