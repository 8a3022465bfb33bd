"""The tabular recipe: table -> columns -> fitted preprocessing -> model -> trained model.

Shared by ``kiln.fit`` (holdout) and cross-validation (k folds), so both prepare
data identically: preprocessing is fitted on the training rows only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from kiln.data.preprocess import JSONScalar, Preprocessor, class_labels
from kiln.data.schema import Column, select_features
from kiln.data.sources import fingerprint, read_table
from kiln.errors import DataError
from kiln.evaluate.scoring import score
from kiln.models.registry import build
from kiln.spec.load import dump_spec
from kiln.spec.spec import Spec
from kiln.train.callbacks import Callback
from kiln.train.checkpoint import CheckpointStore
from kiln.train.loop import FitResult, TensorData, fit_model, predict_outputs


@dataclass
class Table:
    """The loaded table with what was learned about it before any split."""

    frame: pd.DataFrame
    columns: list[Column]
    labels: list[JSONScalar] | None
    fingerprint: str
    rows_read: int
    rows_dropped: int


@dataclass
class Trained:
    model: nn.Module
    preprocessor: Preprocessor
    result: FitResult


def load_table(spec: Spec) -> Table:
    """Read ``spec.data.source`` and select its columns.

    Rows whose target is empty cannot be learned from and are dropped (counted); with
    ``missing: drop`` so are rows with an empty feature. The class label set comes from
    the whole column so every split agrees on it.
    """
    frame = read_table(spec.data.source)
    columns = select_features(frame, spec.data.target, spec.data.features)
    names = [c.name for c in columns]
    frame = frame[[*names, spec.data.target]]
    rows_read = len(frame)
    keep = frame[spec.data.target].notna()
    if spec.data.preprocessing.missing == "drop":
        keep &= frame[names].notna().all(axis=1)
    frame = frame[keep].reset_index(drop=True)
    if frame.empty:
        raise DataError(
            "no rows left after dropping rows with missing values",
            field="data.preprocessing.missing",
        )
    labels = class_labels(frame[spec.data.target]) if spec.task == "classification" else None
    return Table(
        frame=frame,
        columns=columns,
        labels=labels,
        fingerprint=fingerprint(frame),
        rows_read=rows_read,
        rows_dropped=rows_read - len(frame),
    )


def run_id(spec: Spec, table: Table) -> str:
    """Identifies a run for resuming: same spec and same data give the same id."""
    return hashlib.sha256((dump_spec(spec) + table.fingerprint).encode()).hexdigest()[:16]


def train_frames(
    spec: Spec,
    table: Table,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoints: CheckpointStore | None = None,
    resume: bool = False,
) -> Trained:
    """Fit preprocessing on ``train``, build the model, train it (validating on ``val``)."""
    pre = Preprocessor.fit(
        train,
        table.columns,
        spec.data.target,
        spec.task,
        spec.data.preprocessing,
        labels=table.labels,
    )
    data = TensorData(
        x_train=torch.from_numpy(pre.transform(train)),
        y_train=torch.from_numpy(pre.transform_target(train[spec.data.target])),
    )
    if val is not None and len(val):
        data.x_val = torch.from_numpy(pre.transform(val))
        data.y_val = torch.from_numpy(pre.transform_target(val[spec.data.target]))
    n_out = len(table.labels) if table.labels is not None else 1
    # Seed before building so weight initialisation is reproducible too.
    torch.manual_seed(spec.train.seed)
    model = build(spec.model, pre.n_outputs, n_out)
    target_scale = getattr(pre.state.target, "scale", 1.0)
    result = fit_model(
        model,
        data,
        spec.train,
        spec.task,
        spec.resolved_loss,
        target_scale=target_scale,
        callbacks=callbacks,
        checkpoints=checkpoints,
        resume=resume,
        run_id=run_id(spec, table),
    )
    return Trained(model=model, preprocessor=pre, result=result)


def score_frame(
    model: nn.Module, pre: Preprocessor, frame: pd.DataFrame, target: str
) -> dict[str, object]:
    """Metrics of ``model`` on ``frame`` (which holds the target column)."""
    x = torch.from_numpy(pre.transform(frame))
    y = pre.transform_target(frame[target])
    device = next(model.parameters()).device
    outputs = predict_outputs(model, x.to(device)).cpu()
    return score(pre, outputs, np.asarray(y))
