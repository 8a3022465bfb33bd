"""The tabular recipe: table -> columns -> fitted preprocessing -> model -> trained model.

Shared by ``kiln.fit`` (holdout) and cross-validation (k folds), so both prepare
data identically: preprocessing is fitted on the training rows only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from kiln.data.images import FOLDER_IMAGE_COLUMN, augmentation, folder_table, resolve_paths
from kiln.data.preprocess import Preprocessor
from kiln.data.preprocess_fit import class_labels
from kiln.data.preprocess_state import JSONScalar
from kiln.data.schema import Column, select_features
from kiln.data.sources import fingerprint, read_table
from kiln.data.text import join_text, load_tokenizer, train_tokenizer
from kiln.errors import DataError
from kiln.evaluate.metrics import Metrics
from kiln.evaluate.scoring import score
from kiln.models.pretrained import local_model_dir, resolve_model_path
from kiln.models.registry import build
from kiln.runtime.placement import predict_outputs
from kiln.spec.load import dump_spec
from kiln.spec.model import PretrainedSpec, TransformerSpec
from kiln.spec.spec import Spec
from kiln.train.callbacks import Callback
from kiln.train.checkpoint import CheckpointStore
from kiln.train.early_stopping import kfold_folds, train_kfold
from kiln.train.executor import Executor
from kiln.train.loop import FitResult, TensorData, fit_model


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
    context: dict[str, Any]  # JSON facts to rebuild the architecture (bundle model_context)


def load_table(spec: Spec, *, data_root: Path | None = None) -> Table:
    """Read ``spec.data.source`` and select its columns.

    ``data_root`` (a server's copy of a dataset): image paths must name files inside
    it (see :func:`kiln.data.images.resolve_paths`); None keeps local paths as given.

    Rows whose target is empty cannot be learned from and are dropped (counted); with
    ``missing: drop`` so are rows with an empty feature. The class label set comes from
    the whole column so every split agrees on it.
    """
    frame, columns = _read_inputs(spec, data_root)
    names = [c.name for c in columns]
    frame = frame[[*names, spec.data.target]]
    rows_read = len(frame)
    keep = frame[spec.data.target].notna()
    if spec.preprocessing.missing == "drop":
        keep &= frame[names].notna().all(axis=1)
    # Rows keep their table index (splits select by position), so errors name the row
    # the user can find in the file.
    frame = frame[keep]
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
        fingerprint=_fingerprint(frame, columns),
        rows_read=rows_read,
        rows_dropped=rows_read - len(frame),
    )


def _read_inputs(spec: Spec, data_root: Path | None) -> tuple[pd.DataFrame, list[Column]]:
    """The raw table and its input columns, for tabular, text or image data."""
    data = spec.data
    if data.is_image_folder:
        frame = folder_table(data.source, data.target, within=data_root)
        return frame, [Column(name=FOLDER_IMAGE_COLUMN, kind="image")]
    frame = read_table(data.source)
    if data.target not in frame.columns:
        raise DataError(
            f"target column {data.target!r} is not in the data; columns are {list(frame.columns)}",
            field="data.target",
        )
    if data.text is not None:
        missing = [c for c in data.text_columns if c not in frame.columns]
        if missing:
            raise DataError(f"text column(s) {missing} not in the data", field="data.text")
        return frame, [Column(name=c, kind="text") for c in data.text_columns]
    if data.image is not None:
        if "://" in data.source:
            raise DataError("image paths need a local table", field="data.source")
        frame = resolve_paths(frame, data.image, Path(data.source).parent, root=data_root)
        return frame, [Column(name=data.image, kind="image")]
    return frame, select_features(frame, data.target, data.features)


def _fingerprint(frame: pd.DataFrame, columns: list[Column]) -> str:
    """Table content hash; for images, the images' bytes rather than where they lie."""
    image_cols = [c.name for c in columns if c.kind == "image"]
    if not image_cols:
        return fingerprint(frame)
    col = image_cols[0]
    digests = [_file_digest(p) for p in frame[col]]
    return fingerprint(frame.drop(columns=[col]).assign(**{col: digests}))


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return "unreadable"  # decoding reports the file with its row later
    return digest.hexdigest()


def run_id(spec: Spec, fingerprint: str) -> str:
    """Identifies a run for resuming: same spec and same data (by ``fingerprint``, a
    table's or a generation corpus's) give the same id.

    The data counts by content (its fingerprint), not by where it was read from: a
    queued job's worker reads its dataset from a fresh temporary copy on every attempt.
    """
    unlocated = spec.model_copy(update={"data": spec.data.model_copy(update={"source": ""})})
    return hashlib.sha256((dump_spec(unlocated) + fingerprint).encode()).hexdigest()[:16]


def train_frames(
    spec: Spec,
    table: Table,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoints: CheckpointStore | None = None,
    resume: bool = False,
    kfold_epochs: bool = False,
    executor: Executor | None = None,
) -> Trained:
    """Fit preprocessing on ``train``, build the model, train it (validating on ``val``).

    Tree models are boosted by their library (:mod:`kiln.train.tree_recipe`; they keep
    no checkpoints: a resumed run boosts again from the start).

    ``executor``: where a spec with ``train.resources`` trains (in-process without one;
    k-fold early stopping's folds always train in-process).

    ``kfold_epochs``: allow k-fold early stopping (``train.early_stopping.folds``),
    which trains the returned model on ``train`` AND ``val`` (so a caller that scores
    on ``val`` afterwards must leave it off; ``kiln.fit`` turns it on).
    """
    if spec.model.type == "gbdt":
        from kiln.train.tree_recipe import train_trees

        return train_trees(spec, table, train, val, callbacks=callbacks)
    folds = kfold_folds(spec, train, val) if kfold_epochs else None
    if folds is not None:
        return train_kfold(
            spec,
            table,
            train,
            val,
            folds,
            callbacks=callbacks,
            checkpoints=checkpoints,
            resume=resume,
        )
    pre, context = _fit_preprocessing(spec, table, train)
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
    model = build(spec.model, pre.n_outputs, n_out, **context)
    hf_config = getattr(model, "hf_config", None)
    if hf_config is not None:
        context["hf_config"] = hf_config()
    augment = None
    if spec.data.augment is not None and pre.state.image is not None:
        img = pre.state.image
        augment = augmentation(spec.data.augment, img.size, img.channels, img.mean, img.std)
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
        run_id=run_id(spec, table.fingerprint),
        augment=augment,
        executor=executor,
    )
    merge = getattr(model, "merge_adapters", None)
    if merge is not None:
        merge()
    return Trained(model=model, preprocessor=pre, result=result, context=context)


def _fit_preprocessing(
    spec: Spec, table: Table, train: pd.DataFrame
) -> tuple[Preprocessor, dict[str, Any]]:
    data, target = spec.data, spec.data.target
    if data.text is not None:
        tok = _tokenizer(spec, train)
        max_length = getattr(spec.model, "max_length", 128)
        pre = Preprocessor.fit_text(
            train, data.text_columns, target, spec.task, tok, max_length, labels=table.labels
        )
        return pre, {"pad_id": int(tok.pad_token_id)}
    image_cols = [c.name for c in table.columns if c.kind == "image"]
    if image_cols:
        pre = Preprocessor.fit_image(
            train,
            image_cols[0],
            target,
            spec.task,
            data.image_size,
            data.color,
            labels=table.labels,
        )
        return pre, {"input_shape": pre.input_shape}
    pre = Preprocessor.fit(
        train, table.columns, target, spec.task, spec.preprocessing, labels=table.labels
    )
    return pre, {}


def _tokenizer(spec: Spec, train: pd.DataFrame) -> Any:
    """A pretrained model's own tokenizer, or one learned from the training texts."""
    model = spec.model
    if isinstance(model, PretrainedSpec):
        path = resolve_model_path(model.path)
        local_model_dir(path)  # a clear error for a folder without config.json
        return load_tokenizer(path)
    assert isinstance(model, TransformerSpec)
    texts = join_text(train, spec.data.text_columns)
    return train_tokenizer(texts, model.vocab_size, model.lowercase)


def score_frame(model: nn.Module, pre: Preprocessor, frame: pd.DataFrame, target: str) -> Metrics:
    """Metrics of ``model`` on ``frame`` (which holds the target column)."""
    x = torch.from_numpy(pre.transform(frame))
    y = pre.transform_target(frame[target])
    first = next(model.parameters(), None)  # tree models have no parameters: CPU
    device = first.device if first is not None else torch.device("cpu")
    outputs = predict_outputs(model, x.to(device)).cpu()
    return score(pre, outputs, np.asarray(y))
