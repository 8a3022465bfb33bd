"""The streaming recipe: a Parquet dataset larger than memory -> a trained torch model.

``data.streaming: true`` reads the source a row group at a time and never whole: one
pass fits the preprocessing on the training split (:mod:`kiln.data.stream_fit`), the
validation split is kept in memory up to :data:`~kiln.data.stream_fit.VAL_ROWS` rows,
the engine trains from a :class:`~kiln.data.stream.ParquetBatches` stream, and the
test split is scored by a second streaming pass (outputs and targets accumulate, not
rows). Only tabular data and torch-engine models (linear, mlp) stream.

:func:`fit_streaming` returns everything ``kiln.fit`` puts in the bundle's manifest;
the manifest itself is assembled above this layer (:mod:`kiln.workflow`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from kiln.data.parquet import ParquetSource, discover
from kiln.data.preprocess import Preprocessor
from kiln.data.preprocess_state import JSONScalar
from kiln.data.schema import Column, select_features
from kiln.data.stream import HashSplit, ParquetBatches, StreamTable
from kiln.data.stream_fit import SplitCounts, StreamFit, fit_stream
from kiln.errors import SpecError
from kiln.evaluate.metrics import Metrics
from kiln.evaluate.scoring import score
from kiln.models.registry import build
from kiln.runtime.placement import predict_outputs
from kiln.spec.spec import Spec
from kiln.train.callbacks import Callback
from kiln.train.checkpoint import CheckpointStore
from kiln.train.executor import Executor
from kiln.train.loop import TensorData, fit_model
from kiln.train.recipe import Trained, run_id

STREAMING_MODELS = ("linear", "mlp")
SCHEMA_ROWS = 10_000  # first rows read to infer the columns' kinds


@dataclass
class StreamTrained:
    """A streamed fit: the trained model and the facts of its data and splits."""

    trained: Trained
    metrics: dict[str, Metrics]  # test (streamed) and val (in memory), when present
    columns: list[Column]
    labels: list[JSONScalar] | None
    fingerprint: str
    rows_read: int
    rows_dropped: int
    counts: SplitCounts
    reference: pd.DataFrame  # a sample of raw training rows (drift reference)


def check_streaming(spec: Spec) -> None:
    """SpecError naming ``data.streaming`` for what cannot stream."""
    data = spec.data
    if spec.task not in ("classification", "regression"):
        raise SpecError(
            f"data.streaming: not available for task {spec.task}", field="data.streaming"
        )
    if data.text is not None or data.image is not None or data.is_image_folder:
        raise SpecError(
            "data.streaming: tabular data only (no text or images)", field="data.streaming"
        )
    if spec.model.type not in STREAMING_MODELS:
        raise SpecError(
            f"data.streaming: trains {list(STREAMING_MODELS)} models, not {spec.model.type}",
            field="data.streaming",
        )
    if spec.train.batch_size == "full":
        raise SpecError(
            "data.streaming: train.batch_size must be a number of rows, not full",
            field="train.batch_size",
        )


def fit_streaming(
    spec: Spec,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoints: CheckpointStore | None = None,
    resume: bool = False,
    executor: Executor | None = None,
) -> StreamTrained:
    """Fit preprocessing in one pass, train on the stream, score test by a second pass."""
    check_streaming(spec)
    source = discover(spec.data.source)
    table, columns = open_table(spec, source)
    fitted = fit_stream(table, columns, spec.task, spec.preprocessing)
    pre = fitted.preprocessor
    fingerprint = source.fingerprint()
    model = _build(spec, pre, fitted.labels)
    data = _tensor_data(pre, fitted, table.target)
    data.stream = ParquetBatches(table, pre, fitted.group_rows)
    result = fit_model(
        model,
        data,
        spec.train,
        spec.task,
        spec.resolved_loss,
        target_scale=getattr(pre.state.target, "scale", 1.0),
        callbacks=callbacks,
        checkpoints=checkpoints,
        resume=resume,
        run_id=run_id(spec, fingerprint),
        executor=executor,
    )
    metrics: dict[str, Metrics] = {}
    if fitted.counts.test:
        metrics["test"] = score_stream(model, pre, table)
    if data.x_val is not None and data.y_val is not None and len(data.x_val):
        metrics["val"] = _score_tensors(model, pre, data.x_val, data.y_val)
    return StreamTrained(
        trained=Trained(model=model, preprocessor=pre, result=result, context={}),
        metrics=metrics,
        columns=columns,
        labels=fitted.labels,
        fingerprint=fingerprint,
        rows_read=fitted.rows_read,
        rows_dropped=fitted.rows_dropped,
        counts=fitted.counts,
        reference=fitted.reference,
    )


def open_table(spec: Spec, source: ParquetSource) -> tuple[StreamTable, list[Column]]:
    """The streamed table and its feature columns, their kinds inferred from the first
    :data:`SCHEMA_ROWS` rows (as without streaming, every column but the target by
    default: list ``data.features`` to leave an id column out)."""
    data = spec.data
    columns = select_features(source.head(SCHEMA_ROWS), data.target, data.features)
    split = HashSplit(
        test=data.split.test, val=data.split.val, seed=data.split.seed, key=data.split.key
    )
    drop = spec.preprocessing.missing == "drop"
    table = StreamTable.open(source, [c.name for c in columns], data.target, split, drop)
    return table, columns


def _build(spec: Spec, pre: Preprocessor, labels: list[JSONScalar] | None) -> nn.Module:
    n_out = len(labels) if labels is not None else 1
    torch.manual_seed(spec.train.seed)  # reproducible initial weights
    return build(spec.model, pre.n_outputs, n_out)


def _tensor_data(pre: Preprocessor, fitted: StreamFit, target: str) -> TensorData:
    """Empty training tensors (the stream replaces them) and the in-memory val split."""
    y_dtype = torch.int64 if fitted.labels is not None else torch.float32
    data = TensorData(
        x_train=torch.empty(0, pre.n_outputs, dtype=torch.float32),
        y_train=torch.empty(0, dtype=y_dtype),
    )
    if fitted.val is not None and len(fitted.val):
        data.x_val = torch.from_numpy(pre.transform(fitted.val))
        data.y_val = torch.from_numpy(pre.transform_target(fitted.val[target]))
    return data


def score_stream(model: nn.Module, pre: Preprocessor, table: StreamTable) -> Metrics:
    """Metrics on the test split, read by one streaming pass; only the model's outputs
    (N, C) and the encoded targets (N,) accumulate."""
    outputs: list[torch.Tensor] = []
    targets: list[np.ndarray] = []
    device = _device(model)
    for chunk in table.chunks():
        rows = chunk.rows("test")
        if not len(rows):
            continue
        x = torch.from_numpy(pre.transform(rows)).to(device)
        outputs.append(predict_outputs(model, x).cpu())
        targets.append(pre.transform_target(rows[table.target]))
    return score(pre, torch.cat(outputs), np.concatenate(targets))


def _score_tensors(
    model: nn.Module, pre: Preprocessor, x: torch.Tensor, y: torch.Tensor
) -> Metrics:
    outputs = predict_outputs(model, x.to(_device(model))).cpu()
    return score(pre, outputs, y.numpy())


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
