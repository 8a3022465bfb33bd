"""A bundle made ready to answer requests: input checks, a chosen backend, warm-up.

Inputs are checked against the bundle's schema per request (so one bad request never
fails a batch it would have shared); the forward pass then runs on whole batches:
preprocessing is vectorised over the batch's DataFrame, not per row (all-numeric
inputs in one array operation: the library's ``Bundle.predict`` path). The backend is
the runtime's choice (``kiln.runtime.select.select_backend``).

A missing value is JSON ``null`` (NaN in a numeric matrix: KServe v2's ``input``
tensor), and it means what it means to ``Bundle.predict``: imputed where the bundle's
preprocessing imputes that column, a 422 naming ``inputs[i].<column>`` where it refuses
missing values (``missing: drop``; text and image columns have no imputation). An
absent column is not a missing value: it is a 422 too, whatever the preprocessing,
since a misspelt or forgotten key would otherwise be imputed without a word.

An image model's image column takes the image itself, never a path: base64 text in
JSON, or raw bytes (a KServe v2 binary ``BYTES`` tensor). Each one is decoded once
while its request is checked (at most ``kiln.data.images.MAX_PIXELS`` pixels), so a bad
image is a 422 naming ``inputs[i].<column>``.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kiln.data.encoders import numeric_rows
from kiln.errors import DataError
from kiln.runtime import Backend, ServingChoice

if TYPE_CHECKING:
    from kiln.manifest import BundleMeta

MAX_ROWS = 10_000
"""The most rows one request may carry (422 past it)."""


@dataclass
class Output:
    predictions: list[Any]
    probabilities: list[list[float]] | None
    labels: list[Any] | None


class ServedModel:
    """One version of a model, loaded, on its backend, warmed up."""

    def __init__(self, path: str | Path, backend: ServingChoice = "auto") -> None:
        from kiln.bundle import Bundle
        from kiln.runtime.select import select_backend

        started = time.perf_counter()
        self.bundle = Bundle.load(path)
        selection = select_backend(
            self.bundle.model,
            self.bundle.meta.runtime,
            backend,
            onnx=self.bundle.onnx,
            example=self.bundle.example_input(),
            samples=self._samples(),
        )
        self.backend: Backend = selection.backend
        self.backend_name: str = selection.backend.name
        self.parity = selection.parity
        self.columns = [(c.name, c.kind) for c in self.bundle.meta.input_schema]
        self.feature_order = [name for name, _ in self.columns]
        # built once: a DataFrame given an Index builds in microseconds, given a list in
        # a tenth of a millisecond
        self._column_index = pd.Index(self.feature_order)
        self._numeric_only = all(kind == "numeric" for _, kind in self.columns)
        # the columns whose missing values the preprocessing fills (missing: mean...) or
        # passes on as missing (native: trees)
        features = self.bundle.preprocessor.state.features
        self.imputed = frozenset(f.name for f in features if f.accepts_missing)
        self._refused = np.array([name not in self.imputed for name in self.feature_order])
        self.warm_up()
        # A served model lives as long as its server. Everything alive now (the model,
        # torch, pandas and the rest imported to load it: ~500k objects) moves out of
        # the cyclic collector's sight, so the full collections that requests' garbage
        # triggers scan only what is new instead of stalling every request for
        # hundreds of milliseconds.
        gc.freeze()
        self.load_seconds = time.perf_counter() - started

    @property
    def meta(self) -> BundleMeta:
        return self.bundle.meta

    def _samples(self) -> np.ndarray:
        """Random inputs shaped like real ones, several rows, for the parity check."""
        import torch

        from kiln.models.gbdt import GBDTModel

        if isinstance(self.bundle.model, GBDTModel):  # native rows: NaN and category codes
            from kiln.runtime.trees import tree_samples

            return tree_samples(self.bundle.preprocessor.state.features)
        example = self.bundle.example_input()
        generator = torch.Generator().manual_seed(0)
        if example.dtype == torch.long:  # tokens (N, 2, L): ids and mask
            vocab = int(self.bundle.meta.model_context.get("vocab_size", 100))
            ids = torch.randint(1, max(2, min(vocab, 1000)), (8, 1, 12), generator=generator)
            return torch.cat([ids, torch.ones_like(ids)], dim=1).numpy()
        shape = (8, *example.shape[1:])
        return torch.randn(shape, generator=generator).numpy().astype(np.float32)

    def warm_up(self) -> None:
        """One forward pass, so the first request does not pay for lazy initialisation."""
        self.backend.forward(self.bundle.example_input().numpy())

    # ---- requests --------------------------------------------------------------

    def check_rows(self, rows: Any, field: str = "inputs") -> pd.DataFrame:
        """A request's rows as a DataFrame in schema order; DataError names row and column.

        A missing column, a value of the wrong type, NaN or infinity (not JSON: a missing
        value is ``null``) and ``null`` in a column the preprocessing does not impute
        are refused here, before the request joins a batch.
        """
        if not isinstance(rows, list) or not rows:
            raise DataError(f"{field} must be a non-empty list of rows", field=field)
        if len(rows) > MAX_ROWS:
            raise DataError(f"{field}: at most {MAX_ROWS} rows per request", field=field)
        if self._numeric_only:
            matrix = _plain_numbers(rows, self.feature_order)
            if matrix is not None:
                return pd.DataFrame(matrix, columns=self._column_index, copy=False)
        # anything else (or anything the fast path doubts) is checked value by value,
        # so the first error in row, then column order is the one reported
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(
                    f"{field}[{i}] must be an object of column: value", field=f"{field}[{i}]"
                )
            for name, kind in self.columns:
                where = f"{field}[{i}].{name}"
                if name not in row:
                    raise DataError(f"{where}: missing (a missing value is null)", field=where)
                self._check_value(row[name], name, kind, where)
        images = [name for name, kind in self.columns if kind == "image"]
        if images:
            rows = [_with_images(row, images, f"{field}[{i}]") for i, row in enumerate(rows)]
        if self._numeric_only:
            # nulls as NaN: the float64 frame the batcher stacks and the encoder imputes
            # in one array operation (from_records would take ten times as long)
            names = self.feature_order
            matrix = np.array([[row[n] for n in names] for row in rows], dtype=np.float64)
            return pd.DataFrame(matrix, columns=self._column_index, copy=False)
        return pd.DataFrame.from_records(rows, columns=self._column_index)

    def _check_value(self, value: Any, name: str, kind: str, where: str) -> None:
        """One JSON value of column ``name``, of kind ``kind``; DataError at ``where``.
        Images are only decoded later, once the row's other values passed."""
        if value is None:
            self._check_missing(name, kind, where)
        elif kind == "numeric":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise DataError(
                    f"{where}: expected a number, got {type(value).__name__}", field=where
                )
            # an int past float64's range is no more usable than infinity
            if isinstance(value, int) and abs(value) > sys.float_info.max:
                raise DataError(f"{where}: the number is past float64's range", field=where)
            if not math.isfinite(value):
                raise DataError(
                    f"{where}: {value} is not a finite number (a missing value is null)",
                    field=where,
                )
        elif kind == "text":
            if not isinstance(value, str):
                raise DataError(f"{where}: expected a string", field=where)
        elif kind != "image" and (
            not isinstance(value, str | int | float) or isinstance(value, bool)
        ):
            raise DataError(f"{where}: expected a string or a number", field=where)

    def _check_missing(self, name: str, kind: str, where: str) -> None:
        """A missing value of column ``name`` is imputed; else a DataError at ``where``."""
        if name in self.imputed:
            return
        why = (
            "the model's preprocessing refuses missing values (missing: drop)"
            if kind in ("numeric", "categorical")
            else f"a {kind} column has no imputation"
        )
        raise DataError(f"{where}: missing value; {why}", field=where)

    def check_matrix(self, values: np.ndarray, field: str = "input") -> pd.DataFrame:
        """An (N, F) numeric matrix in schema order (KServe v2 ``input``) as rows; NaN is
        a missing value (imputed, or refused as :meth:`check_rows` refuses ``null``)."""
        if values.ndim != 2 or values.shape[1] != len(self.feature_order):
            raise DataError(
                f"{field}: expected shape [N, {len(self.feature_order)}], got {list(values.shape)}",
                field=field,
            )
        if len(values) == 0:
            raise DataError(f"{field}: at least one row is needed", field=field)
        if any(kind != "numeric" for _, kind in self.columns):
            raise DataError(
                f"{field}: this model has non-numeric columns; send one tensor per column",
                field=field,
            )
        # NaN is the matrix's missing value: refused only where it is not imputed
        bad = np.argwhere(np.isinf(values) | (np.isnan(values) & self._refused))
        if len(bad):
            i, j = bad[0]
            name = self.feature_order[j]
            where = f"{field}[{i}].{name}"
            if np.isnan(values[i, j]):
                self._check_missing(name, "numeric", where)
            raise DataError(f"{where}: {values[i, j]} is not a finite number", field=where)
        if len(values) > MAX_ROWS:
            raise DataError(f"{field}: at most {MAX_ROWS} rows per request", field=field)
        return pd.DataFrame(values, columns=self._column_index)

    def predict_frame(self, frame: pd.DataFrame) -> Output:
        """Predictions for a batch (rows already checked), decoded as the library's
        ``Bundle.predict`` decodes them."""
        from kiln.evaluate.scoring import decode

        pre = self.bundle.preprocessor
        decoded = decode(pre, self.backend.forward(pre.transform(frame)))
        proba = decoded.probabilities
        return Output(
            predictions=decoded.predictions,
            probabilities=proba.tolist() if proba is not None else None,
            labels=decoded.labels,
        )


def _with_images(row: dict[str, Any], columns: list[str], where: str) -> dict[str, Any]:
    """The row with each image column's value as checked image bytes (never a path)."""
    from kiln.data.images import check_image, image_bytes

    out = dict(row)
    for name in columns:
        data = image_bytes(row[name], f"{where}.{name}")
        check_image(data, f"{where}.{name}")
        out[name] = data
    return out


def _plain_numbers(rows: list[Any], names: list[str]) -> np.ndarray | None:
    """Rows of plain finite ints and floats (what JSON gives) as an (N, F) float64
    array in ``names`` order; None if any row is anything else (a missing column, a
    string, a bool, NaN...), to be checked value by value."""
    matrix = numeric_rows(rows, names)
    # one sum instead of an isfinite pass: NaN or infinity anywhere (or an overflow
    # of the sum, rare and harmless) sends the rows to the exact check
    if matrix is None or not math.isfinite(matrix.sum()):
        return None
    return matrix
