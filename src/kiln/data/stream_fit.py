"""The streaming fit: preprocessing statistics from one pass over a Parquet dataset.

:func:`fit_stream` reads the table once, a record batch at a time, and merges exact
statistics per batch (counts, Chan's mean/M2, min/max, category counts, the label
set), so the :class:`~kiln.data.preprocess_state.PreprocessState` it builds is the one
:meth:`Preprocessor.fit <kiln.data.preprocess.Preprocessor.fit>` would fit on the same
training rows (to float rounding). Labels come from every kept row, the rest from the
training split only. The same pass counts the splits, keeps the validation rows (up
to a cap) and a sample of training rows (drift reference).

``missing: median`` and ``mode`` need every value of a numeric column at once and are
refused for numeric columns.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kiln.data.column_values import category, check_finite, numeric_column
from kiln.data.preprocess import Preprocessor
from kiln.data.preprocess_fit import class_labels, numeric_fill_value
from kiln.data.preprocess_state import (
    CategoricalFeature,
    ClassTarget,
    JSONScalar,
    NumericFeature,
    PreprocessState,
    RegressionTarget,
)
from kiln.data.schema import Column
from kiln.data.stream import Chunk, StreamTable
from kiln.errors import DataError, SpecError
from kiln.spec.data import Preprocessing

VAL_ROWS = 200_000  # validation rows held in memory (the first, in file order)
REFERENCE_ROWS = 10_000  # training rows sampled (every k-th) for the drift reference


@dataclass
class Moments:
    """Count, mean, sum of squared deviations (M2), min and max of a stream of numbers,
    merged exactly batch by batch (Chan et al.'s parallel update)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    def add(self, values: np.ndarray) -> None:
        """Merge the (finite) ``values`` of one batch."""
        if values.size == 0:
            return
        mean_b = float(values.mean())
        self.merge(
            Moments(
                n=int(values.size),
                mean=mean_b,
                m2=float(((values - mean_b) ** 2).sum()),
                lo=float(values.min()),
                hi=float(values.max()),
            )
        )

    def merge(self, other: Moments) -> None:
        if other.n == 0:
            return
        n = self.n + other.n
        delta = other.mean - self.mean
        self.mean += delta * other.n / n
        self.m2 += other.m2 + delta * delta * self.n * other.n / n
        self.n = n
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)

    @property
    def std(self) -> float:
        """Population standard deviation (numpy's default, ddof 0)."""
        return math.sqrt(max(self.m2, 0.0) / self.n) if self.n else 0.0


@dataclass
class _ColumnStats:
    """One feature column's statistics over the training rows."""

    missing: int = 0
    moments: Moments = field(default_factory=Moments)  # numeric: present values
    counts: Counter[str] = field(default_factory=Counter)  # categorical: category counts


@dataclass(frozen=True)
class SplitCounts:
    """Kept rows per split."""

    train: int
    val: int
    test: int


@dataclass
class StreamFit:
    """What the fitting pass learned and kept."""

    preprocessor: Preprocessor
    labels: list[JSONScalar] | None  # classification: the class set of every kept row
    counts: SplitCounts
    rows_read: int
    rows_dropped: int  # empty target (or feature, missing: drop), all splits
    group_rows: dict[int, int]  # training rows kept per row group (position)
    val: pd.DataFrame | None  # raw validation rows, at most ``val_cap``
    reference: pd.DataFrame  # raw training rows, about ``reference_rows`` (at least one)


@dataclass
class _Pass:
    """Accumulators of the one pass."""

    columns: list[Column]
    target: str
    task: str
    stats: dict[str, _ColumnStats]
    target_moments: Moments = field(default_factory=Moments)
    label_values: set[object] = field(default_factory=set)
    parts: list[int] = field(default_factory=lambda: [0, 0, 0])
    rows_read: int = 0
    dropped: int = 0
    group_rows: Counter[int] = field(default_factory=Counter)
    val: list[pd.DataFrame] = field(default_factory=list)
    val_held: int = 0
    reference: list[pd.DataFrame] = field(default_factory=list)
    first_train: pd.DataFrame | None = None  # the reference when the stride hits no row


def check_streamable(columns: list[Column], options: Preprocessing) -> None:
    """SpecError for preprocessing a single pass cannot fit exactly."""
    numeric = [c.name for c in columns if c.kind == "numeric"]
    if options.missing in ("median", "mode") and numeric:
        raise SpecError(
            f"missing: {options.missing} needs every value of numeric columns {numeric} at "
            "once; with data.streaming use mean, constant, drop or native",
            field="data.preprocessing.missing",
        )
    other = [c.name for c in columns if c.kind not in ("numeric", "categorical")]
    if other:
        raise SpecError(
            f"data.streaming reads tabular columns only, not {other}", field="data.streaming"
        )


def fit_stream(
    table: StreamTable,
    columns: list[Column],
    task: str,
    options: Preprocessing,
    *,
    val_cap: int = VAL_ROWS,
    reference_rows: int = REFERENCE_ROWS,
) -> StreamFit:
    """One pass over ``table``: the fitted preprocessing and the split's facts."""
    check_streamable(columns, options)
    acc = _Pass(columns, table.target, task, {c.name: _ColumnStats() for c in columns})
    stride = max(1, table.source.num_rows // max(1, reference_rows))
    for chunk in table.chunks():
        _add_chunk(acc, chunk, val_cap, stride)
    train, val, test = acc.parts
    if train == 0:
        raise DataError("no training rows (after the split and dropped rows)", field="data.split")
    labels = _labels(acc) if task == "classification" else None
    features = [_feature(c, acc.stats[c.name], options) for c in columns]
    target: ClassTarget | RegressionTarget
    if labels is not None:
        target = ClassTarget(name=table.target, labels=labels)
    else:
        m = acc.target_moments
        target = RegressionTarget(name=table.target, center=m.mean, scale=m.std or 1.0)
    state = PreprocessState(features=features, target=target, missing=options.missing)
    reference = pd.concat(acc.reference) if acc.reference else acc.first_train
    assert reference is not None  # there are training rows
    return StreamFit(
        preprocessor=Preprocessor(state),
        labels=labels,
        counts=SplitCounts(train=train, val=val, test=test),
        rows_read=acc.rows_read,
        rows_dropped=acc.dropped,
        group_rows=dict(acc.group_rows),
        val=pd.concat(acc.val) if acc.val else None,
        reference=reference,
    )


def _add_chunk(acc: _Pass, chunk: Chunk, val_cap: int, stride: int) -> None:
    acc.rows_read += len(chunk.frame)
    acc.dropped += int((~chunk.kept).sum())
    kept = chunk.frame[chunk.kept] if not chunk.kept.all() else chunk.frame
    if acc.task == "classification":
        acc.label_values.update(kept[acc.target].unique().tolist())
    train, val = chunk.rows("train"), chunk.rows("val")
    acc.parts[0] += len(train)
    acc.parts[1] += len(val)
    acc.parts[2] += len(chunk.rows("test"))
    acc.group_rows[chunk.group] += len(train)
    if acc.val_held < val_cap and len(val):
        held = val.iloc[: val_cap - acc.val_held]
        acc.val.append(held)
        acc.val_held += len(held)
    sampled = train[np.asarray(train.index) % stride == 0]
    if len(sampled):
        acc.reference.append(sampled)
    if len(train):
        if acc.first_train is None:
            acc.first_train = train.iloc[:1000]
        _add_train(acc, train)


def _add_train(acc: _Pass, train: pd.DataFrame) -> None:
    """Merge the statistics of one chunk's training rows."""
    for col in acc.columns:
        stats, series = acc.stats[col.name], train[col.name]
        if col.kind == "numeric":
            values = numeric_column(series, col.name)
            check_finite(values, col.name, series.index)
            present = values[~np.isnan(values)]
            stats.missing += values.size - present.size
            stats.moments.add(present)
        else:
            stats.missing += int(series.isna().sum())
            # counts of raw values, then named: 1, 1.0 and "1" become one category
            for value, count in series.value_counts(dropna=True).items():
                stats.counts[category(value)] += int(count)
    if acc.task != "classification":
        y = numeric_column(train[acc.target], acc.target)
        check_finite(y, acc.target, train.index)
        acc.target_moments.add(y)


def _labels(acc: _Pass) -> list[JSONScalar]:
    # class_labels sorts and normalises exactly as the in-memory fit does
    return class_labels(pd.Series(list(acc.label_values), name=acc.target, dtype=object))


def _feature(
    col: Column, stats: _ColumnStats, options: Preprocessing
) -> NumericFeature | CategoricalFeature:
    if col.kind == "numeric":
        return _numeric(col.name, stats, options)
    return _categorical(col.name, stats, options)


def _numeric(name: str, stats: _ColumnStats, options: Preprocessing) -> NumericFeature:
    present = stats.moments
    if present.n == 0:
        raise DataError(f"column {name!r} has no values in the training split", field=name)
    fill = _numeric_fill(present, name, options)
    filled = Moments(present.n, present.mean, present.m2, present.lo, present.hi)
    if fill is not None and stats.missing:
        # each filled row adds the fill value: n more values at ``fill``, no spread
        filled.merge(Moments(n=stats.missing, mean=fill, m2=0.0, lo=fill, hi=fill))
    if options.scale == "standard":
        center, scale = filled.mean, filled.std
    elif options.scale == "minmax":
        center, scale = filled.lo, filled.hi - filled.lo
    else:
        center, scale = 0.0, 1.0
    return NumericFeature(
        name=name,
        fill=fill,
        center=center,
        scale=scale or 1.0,
        native_missing=options.missing == "native",
    )


def _numeric_fill(present: Moments, name: str, options: Preprocessing) -> float | None:
    if options.missing in ("drop", "native"):
        return None
    if options.missing == "mean":
        return present.mean
    return numeric_fill_value(name, options)


def _categorical(name: str, stats: _ColumnStats, options: Preprocessing) -> CategoricalFeature:
    if not stats.counts:
        raise DataError(f"column {name!r} has no values in the training split", field=name)
    fill: str | None
    if options.missing in ("drop", "native"):
        fill = None
    elif options.missing == "constant":
        fill = str(options.fill_value)
    else:
        # the mode; ties go to the smallest name, as pandas' Series.mode sorts them
        top = max(stats.counts.values())
        fill = min(k for k, v in stats.counts.items() if v == top)
    categories = sorted(set(stats.counts) | ({fill} if fill is not None else set()))
    return CategoricalFeature(
        name=name,
        categories=categories,
        fill=fill,
        encoding=options.categorical,
        native_missing=options.missing == "native",
    )
