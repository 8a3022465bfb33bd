"""Fitting the preprocessing state: statistics learned from the training split only.

Each function takes the training rows and returns a piece of
:class:`~kiln.data.preprocess_state.PreprocessState`; nothing here is measured on rows
the model is later evaluated on (no leakage).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kiln.data.column_values import category, check_finite, native, numeric_column
from kiln.data.preprocess_state import (
    CategoricalFeature,
    ClassTarget,
    ImageState,
    JSONScalar,
    NumericFeature,
    RegressionTarget,
)
from kiln.data.schema import Column
from kiln.errors import DataError
from kiln.spec.data import Preprocessing


def fit_features(
    frame: pd.DataFrame, columns: list[Column], options: Preprocessing
) -> list[NumericFeature | CategoricalFeature]:
    """One fitted feature per column, in ``columns`` order."""
    features: list[NumericFeature | CategoricalFeature] = []
    for col in columns:
        if col.kind == "numeric":
            features.append(_fit_numeric(frame, col.name, options))
        else:
            features.append(_fit_categorical(frame[col.name], col.name, options))
    return features


def _fit_numeric(frame: pd.DataFrame, name: str, options: Preprocessing) -> NumericFeature:
    values = numeric_column(frame[name], name)
    check_finite(values, name, frame.index)
    present = values[~np.isnan(values)]
    if present.size == 0:
        raise DataError(f"column {name!r} has no values in the training split", field=name)
    fill = _numeric_fill(present, name, options)
    filled = np.where(np.isnan(values), fill if fill is not None else np.nan, values)
    center, scale = _center_scale(filled[~np.isnan(filled)], options)
    # A constant column would divide by zero; it carries no signal either way.
    return NumericFeature(
        name=name,
        fill=fill,
        center=center,
        scale=scale or 1.0,
        native_missing=options.missing == "native",
    )


def _numeric_fill(present: np.ndarray, name: str, options: Preprocessing) -> float | None:
    """The value a missing number becomes; None under ``missing: drop`` (refused) and
    ``missing: native`` (kept missing)."""
    if options.missing in ("drop", "native"):
        return None
    if options.missing == "mean":
        return float(present.mean())
    if options.missing == "median":
        return float(np.median(present))
    if options.missing == "mode":
        return float(pd.Series(present).mode().iloc[0])
    return numeric_fill_value(name, options)


def numeric_fill_value(name: str, options: Preprocessing) -> float:
    """``missing: constant``'s ``fill_value`` for numeric column ``name``; a DataError
    naming the field when it is not a number."""
    try:
        return float(options.fill_value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(
            f"fill_value {options.fill_value!r} is not a number but column {name!r} is",
            field="data.preprocessing.fill_value",
        ) from None


def _center_scale(filled: np.ndarray, options: Preprocessing) -> tuple[float, float]:
    """What is subtracted and what divides (a zero scale is the caller's to replace)."""
    if options.scale == "standard":
        return float(filled.mean()), float(filled.std())
    if options.scale == "minmax":
        return float(filled.min()), float(filled.max() - filled.min())
    return 0.0, 1.0


def _fit_categorical(series: pd.Series, name: str, options: Preprocessing) -> CategoricalFeature:
    present = series.dropna().map(category)
    if present.empty:
        raise DataError(f"column {name!r} has no values in the training split", field=name)
    fill: str | None
    if options.missing in ("drop", "native"):
        fill = None
    elif options.missing == "constant":
        fill = str(options.fill_value)
    else:
        fill = str(present.mode().iloc[0])
    categories = sorted(set(present) | ({fill} if fill is not None else set()))
    return CategoricalFeature(
        name=name,
        categories=categories,
        fill=fill,
        encoding=options.categorical,
        native_missing=options.missing == "native",
    )


def fit_target(
    frame: pd.DataFrame, target: str, task: str, labels: list[JSONScalar] | None
) -> ClassTarget | RegressionTarget:
    """The class set (``labels``, default: the classes in ``frame``), or the
    standardisation of a regression target."""
    if task == "classification":
        return ClassTarget(name=target, labels=labels or class_labels(frame[target]))
    y = numeric_column(frame[target], target).astype(np.float64)
    check_finite(y, target)
    std = float(y.std())
    return RegressionTarget(name=target, center=float(y.mean()), scale=std or 1.0)


def class_labels(series: pd.Series) -> list[JSONScalar]:
    """The sorted distinct values of a target column, as JSON scalars (at least two)."""
    present = series.dropna()
    if present.empty:
        raise DataError(f"target column {series.name!r} has no values", field=str(series.name))
    uniques = present.unique().tolist()
    try:
        labels = sorted(uniques)
    except TypeError:
        labels = sorted(uniques, key=str)
    if len(labels) < 2:
        raise DataError(
            f"target column {series.name!r} has a single class {labels}; classification "
            "needs at least two",
            field=str(series.name),
        )
    return [native(v) for v in labels]


def fit_image_state(
    frame: pd.DataFrame, column: str, size: tuple[int, int] | None, color: str
) -> ImageState:
    """Images from a path column, decoded to ``size`` (default: the first image's) and
    ``color`` ("grayscale", "rgb", else the first image's); mean/std per channel."""
    from kiln.data.images import decode, probe

    if column not in frame.columns:
        raise DataError(f"image column {column!r} is not in the data", field="data.image")
    first_size, first_channels = probe(str(frame[column].iloc[0]), column, frame.index[0])
    channels = {"grayscale": 1, "rgb": 3}.get(color, first_channels)
    hw: tuple[int, int] = (size[0], size[1]) if size is not None else first_size
    pixels = decode(frame[column], hw, channels).astype(np.float32) / 255.0
    mean = pixels.mean(axis=(0, 2, 3))
    std = pixels.std(axis=(0, 2, 3))
    return ImageState(
        column=column,
        size=hw,
        channels=channels,
        mean=[float(m) for m in mean],
        std=[float(s) if s > 1e-6 else 1.0 for s in std],
    )
