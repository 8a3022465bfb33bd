"""A bundle made ready to answer requests: input checks, a chosen backend, warm-up.

Inputs are checked against the bundle's schema per request (so one bad request never
fails a batch it would have shared); the forward pass then runs on whole batches:
preprocessing is vectorised over the batch's DataFrame, not per row.
"""

from __future__ import annotations

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
        if self.bundle.preprocessor.kind == "image":
            # image inputs are file paths, and a server must not open paths callers name
            raise SpecError("image models cannot be deployed yet", field="model")
        self.backend_name, self.parity = self._choose(backend)
        self.columns = [(c.name, c.kind) for c in self.bundle.meta.input_schema]
        self.feature_order = [name for name, _ in self.columns]
        self.warm_up()
        self.load_seconds = time.perf_counter() - started

    @property
    def meta(self) -> Any:
        return self.bundle.meta

    def _choose(self, backend: BackendChoice) -> tuple[str, float | None]:
        """``auto``: onnxruntime on the CPU when the export agrees with torch, else torch."""
        import torch

        runtime = self.bundle.meta.runtime
        if runtime.get("backend") == "onnxruntime":  # an int8 variant: ONNX is the model
            if backend == "torch":
                raise SpecError(
                    "this version is an onnxruntime variant; it has no torch backend",
                    field="backend",
                )
            return "onnxruntime", None
        if backend == "torch" or runtime.get("quantization") is not None:
            return "torch", None
        if backend == "auto" and torch.cuda.is_available():
            return "torch", None
        from kiln.runtime.onnx import OnnxBackend, check_parity, export_onnx

        try:
            onnx = export_onnx(self.bundle.model, self.bundle.example_input())
            diff = check_parity(self.bundle.model, onnx, self._samples())
        except ExportError as exc:
            if backend == "onnx":
                raise SpecError(f"backend onnx: {exc.message}", field="backend") from None
            return "torch", None
        self.bundle._backend = OnnxBackend(onnx, threads=torch.get_num_threads())
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
                elif kind in ("text", "image"):
                    if not isinstance(value, str):
                        raise DataError(f"{where}: expected a string", field=where)
                elif not isinstance(value, str | int | float) or isinstance(value, bool):
                    raise DataError(f"{where}: expected a string or a number", field=where)
        return pd.DataFrame.from_records(rows, columns=self.feature_order)

    def check_matrix(self, values: np.ndarray, field: str = "input") -> pd.DataFrame:
        """An (N, F) numeric matrix in schema order (KServe v2 ``input``) as rows."""
        if values.ndim != 2 or values.shape[1] != len(self.feature_order):
            raise DataError(
                f"{field}: expected shape [N, {len(self.feature_order)}], got {list(values.shape)}",
                field=field,
            )
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
        return pd.DataFrame(values, columns=self.feature_order)

    def predict_frame(self, frame: pd.DataFrame) -> Output:
        """Predictions for a batch (rows already checked)."""
        import torch

        from kiln.evaluate.scoring import decode_outputs

        pre = self.bundle.preprocessor
        outputs = self.bundle.backend.forward(pre.transform(frame))
        decoded = decode_outputs(pre, torch.from_numpy(outputs))
        proba = decoded["probabilities"]
        return Output(
            predictions=list(decoded["predictions"]),
            probabilities=proba.tolist() if proba is not None else None,
            labels=decoded["labels"],
        )
