"""A bundle made ready to answer requests: input checks, a chosen backend, warm-up.

Inputs are checked against the bundle's schema per request (so one bad request never
fails a batch it would have shared); the forward pass then runs on whole batches:
preprocessing is vectorised over the batch's DataFrame, not per row.

An image model's image column takes the image itself, never a path: base64 text in
JSON, or raw bytes (a KServe v2 binary ``BYTES`` tensor). Each one is decoded once
while its request is checked (at most ``kiln.data.images.MAX_PIXELS`` pixels), so a bad
image is a 422 naming ``inputs[i].<column>``.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from kiln.errors import DataError, ExportError, SpecError

BackendChoice = Literal["auto", "torch", "onnx"]
MAX_ROWS = 10_000
"""The most rows one request may carry (422 past it)."""


@dataclass
class Output:
    predictions: list[Any]
    probabilities: list[list[float]] | None
    labels: list[Any] | None


class ServedModel:
    """One version of a model, loaded, on its backend, warmed up."""

    def __init__(self, path: str | Path, backend: BackendChoice = "auto") -> None:
        from kiln.bundle import Bundle

        started = time.perf_counter()
        self.bundle = Bundle.load(path)
        self.backend_name, self.parity = self._choose(backend)
        self.columns = [(c.name, c.kind) for c in self.bundle.meta.input_schema]
        self.feature_order = [name for name, _ in self.columns]
        # built once: a DataFrame given an Index builds in microseconds, given a list in
        # a tenth of a millisecond
        self._column_index = pd.Index(self.feature_order)
        self._numeric_only = all(kind == "numeric" for _, kind in self.columns)
        self._scaling = self._numeric_scaling()
        self.warm_up()
        # A served model lives as long as its server. Everything alive now (the model,
        # torch, pandas and the rest imported to load it: ~500k objects) moves out of
        # the cyclic collector's sight, so the full collections that requests' garbage
        # triggers scan only what is new instead of stalling every request for
        # hundreds of milliseconds.
        gc.freeze()
        self.load_seconds = time.perf_counter() - started

    @property
    def meta(self) -> Any:
        return self.bundle.meta

    def _choose(self, backend: BackendChoice) -> tuple[str, float | None]:
        """``auto``: onnxruntime on the CPU when the export agrees with torch, else torch."""
        import torch

        from kiln.runtime.onnx import OnnxBackend, check_parity, export_onnx

        # Between batches onnxruntime's threads would spin, busy-waiting for the next
        # run on cores the event loop needs (and slowing torch's softmax after each run
        # from microseconds to milliseconds on a 2-core machine): no spinning here.
        runtime = self.bundle.meta.runtime
        if runtime.backend == "onnxruntime":  # an int8 variant: ONNX is the model
            if backend == "torch":
                raise SpecError(
                    "this version is an onnxruntime variant; it has no torch backend",
                    field="backend",
                )
            if self.bundle.onnx is not None:
                self.bundle._backend = OnnxBackend(self.bundle.onnx, spinning=False)
            return "onnxruntime", None
        if backend == "torch" or runtime.quantization is not None:
            return "torch", None
        if backend == "auto" and torch.cuda.is_available():
            return "torch", None
        try:
            onnx = export_onnx(self.bundle.model, self.bundle.example_input())
            diff = check_parity(self.bundle.model, onnx, self._samples())
        except ExportError as exc:
            if backend == "onnx":
                raise SpecError(f"backend onnx: {exc.message}", field="backend") from None
            return "torch", None
        self.bundle._backend = OnnxBackend(onnx, threads=torch.get_num_threads(), spinning=False)
        return "onnxruntime", diff

    def _samples(self) -> np.ndarray:
        """Random inputs shaped like real ones, several rows, for the parity check."""
        import torch

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
        self.bundle.backend.forward(self.bundle.example_input().numpy())

    def _numeric_scaling(self) -> tuple[pd.Index, np.ndarray, np.ndarray] | None:
        """For a model whose inputs are all numeric features: their names, centres and
        scales, to encode a checked batch as one array operation instead of the
        preprocessor's column-by-column pass (about 0.15 ms a column, whatever the rows).

        Used only if it encodes a sample exactly as the preprocessor does.
        """
        from kiln.data.preprocess import NumericFeature

        pre = self.bundle.preprocessor
        features = [f for f in pre.state.features if isinstance(f, NumericFeature)]
        if pre.kind != "tabular" or not features or len(features) != len(pre.state.features):
            return None
        names = pd.Index([f.name for f in features])
        center = np.array([f.center for f in features], dtype=np.float64)
        scale = np.array([f.scale for f in features], dtype=np.float64)
        scaling = (names, center, scale)
        sample = np.random.default_rng(0).normal(size=(7, len(features))) * 10
        for values in (sample, sample.astype(np.float32), sample.round().astype(np.int64)):
            frame = pd.DataFrame(values, columns=names)
            fast = _scale(frame, *scaling)
            if fast is None or not np.array_equal(fast, pre.transform(frame)):
                return None
        return scaling

    # ---- requests --------------------------------------------------------------

    def check_rows(self, rows: Any, field: str = "inputs") -> pd.DataFrame:
        """A request's rows as a DataFrame in schema order; DataError names row and column.

        A missing column, a value of the wrong type, NaN or infinity is refused here,
        before the request joins a batch.
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
                    raise DataError(f"{where}: missing", field=where)
                value = row[name]
                if kind == "numeric":
                    if isinstance(value, bool) or not isinstance(value, int | float):
                        raise DataError(
                            f"{where}: expected a number, got {type(value).__name__}", field=where
                        )
                    if not math.isfinite(value):
                        raise DataError(f"{where}: {value} is not a finite number", field=where)
                elif kind == "image":
                    continue  # decoded below, once the row's other values passed
                elif kind == "text":
                    if not isinstance(value, str):
                        raise DataError(f"{where}: expected a string", field=where)
                elif not isinstance(value, str | int | float) or isinstance(value, bool):
                    raise DataError(f"{where}: expected a string or a number", field=where)
        images = [name for name, kind in self.columns if kind == "image"]
        if images:
            rows = [_with_images(row, images, f"{field}[{i}]") for i, row in enumerate(rows)]
        return pd.DataFrame.from_records(rows, columns=self.feature_order)

    def check_matrix(self, values: np.ndarray, field: str = "input") -> pd.DataFrame:
        """An (N, F) numeric matrix in schema order (KServe v2 ``input``) as rows."""
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
        bad = np.argwhere(~np.isfinite(values))
        if len(bad):
            i, j = bad[0]
            where = f"{field}[{i}].{self.feature_order[j]}"
            raise DataError(f"{where}: {values[i, j]} is not a finite number", field=where)
        if len(values) > MAX_ROWS:
            raise DataError(f"{field}: at most {MAX_ROWS} rows per request", field=field)
        return pd.DataFrame(values, columns=self._column_index)

    def predict_frame(self, frame: pd.DataFrame) -> Output:
        """Predictions for a batch (rows already checked).

        Decoded as ``kiln.evaluate.scoring.decode_outputs`` does, in numpy: a torch
        softmax wakes torch's thread pool, whose threads then spin on the cores the
        server needs (twice the CPU of the call itself, on every batch).
        """
        pre = self.bundle.preprocessor
        encoded = _scale(frame, *self._scaling) if self._scaling is not None else None
        if encoded is None:
            encoded = pre.transform(frame)
        outputs = np.asarray(self.bundle.backend.forward(encoded), dtype=np.float32)
        labels = pre.labels
        if labels is None:  # regression: (N, 1) in the target's units
            values = pre.inverse_target(outputs.squeeze(-1).astype(np.float64))
            return Output(predictions=values.tolist(), probabilities=None, labels=None)
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        proba = exp / exp.sum(axis=1, keepdims=True)
        return Output(
            predictions=[labels[i] for i in proba.argmax(axis=1)],
            probabilities=proba.tolist(),
            labels=labels,
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
    try:
        values = [[row[name] for name in names] for row in rows]
    except (KeyError, TypeError):  # a missing column, a row that is no dict
        return None
    for row_values in values:
        for value in row_values:
            kind = type(value)
            if kind is not float and kind is not int:  # bool is neither
                return None
    try:
        matrix = np.array(values, dtype=np.float64)
    except OverflowError:
        return None
    # one sum instead of an isfinite pass: NaN or infinity anywhere (or an overflow
    # of the sum, rare and harmless) sends the rows to the exact check
    if not math.isfinite(matrix.sum()):
        return None
    return matrix


def _scale(
    frame: pd.DataFrame, names: pd.Index, center: np.ndarray, scale: np.ndarray
) -> np.ndarray | None:
    """The preprocessor's standardisation of all-numeric features, over the whole batch,
    in float64 as the preprocessor computes it.

    None when the frame is not a plain matrix of finite numbers in ``names`` order:
    the preprocessor then handles (fills, or refuses) it.
    """
    if not frame.columns.equals(names):
        return None
    values = frame.to_numpy()
    if values.dtype.kind not in "iuf":  # objects, bools
        return None
    values = values.astype(np.float64, copy=False)
    if not np.isfinite(values).all():  # missing values are filled or refused there
        return None
    scaled: np.ndarray = ((values - center) / scale).astype(np.float32)
    return scaled
