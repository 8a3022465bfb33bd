"""``kiln.fit``: from a spec to a trained, evaluated bundle (holdout split)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.bundle import Bundle, check_destination, new_meta
from kiln.data.sources import absolute_source
from kiln.data.split import Holdout, holdout
from kiln.evaluate.metrics import Metrics
from kiln.manifest import (
    BundleMeta,
    CandidateRecord,
    DataRecord,
    EpochChoiceRecord,
    JSONDocument,
    Lineage,
    SelectionRecord,
    SplitRecord,
    TrainingRecord,
)
from kiln.models.summary import count_parameters
from kiln.monitor.drift import reference_stats
from kiln.spec.load import load_spec
from kiln.spec.spec import Spec
from kiln.train.callbacks import Callback
from kiln.train.checkpoint import CheckpointStore, DirCheckpoints
from kiln.train.recipe import Table, Trained, load_table, score_frame, train_frames

if TYPE_CHECKING:
    import pandas as pd

    from kiln.lm_bundle import LMBundle
    from kiln.train.auto import Selection
    from kiln.train.early_stopping import EpochChoice
    from kiln.train.executor import Executor


SplitMetrics = dict[str, Metrics]
"""Per held-out split (``test``, ``val``): what :func:`kiln.evaluate` measured."""


def checkpoint_dir(out: str | Path) -> Path:
    """Where ``kiln train --out DIR`` keeps its checkpoints: a hidden sibling of DIR."""
    out = Path(out)
    return out.with_name(f".{out.name}.ckpt")


def fit(
    spec: Spec | JSONDocument | str | Path,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    checkpoints: str | Path | CheckpointStore | None = None,
    data_root: Path | None = None,
    executor: Executor | None = None,
) -> Bundle | LMBundle:
    """Train the model a spec describes and return its bundle (an :class:`LMBundle` for
    ``task: generation``).

    The table is split into train/val/test; preprocessing is fitted on train only;
    test metrics are measured once at the end. With ``out`` the bundle is saved there
    (atomically) and a checkpoint is written after every epoch to ``checkpoints``
    (a directory or any ``CheckpointStore``; default: a hidden sibling of ``out``),
    removed once the bundle is saved; ``resume=True`` continues from it. ``data_root``
    (a server's dataset folder) confines image paths to it. With an ``executor`` (a Ray
    cluster), a spec with ``train.resources`` trains there, data-parallel.
    """
    spec = load_spec(spec)
    if out is not None:
        check_destination(Path(out))  # fail before training, not after
    if spec.task == "generation":
        return _fit_generation(spec, out, resume, callbacks, checkpoints, executor)
    if spec.data.streaming:  # out-of-core Parquet (kiln.train.stream_recipe)
        return _fit_streaming(spec, out, resume, callbacks, checkpoints, executor)
    started = time.perf_counter()
    table = load_table(spec, data_root=data_root)
    frames = _Frames.split(spec, table)
    store = _checkpoint_store(checkpoints, out)
    written, selection = spec, None
    if spec.model.type == "auto":  # select on the non-test rows, then train the winner
        from kiln.train.auto import train_selected

        trained, selection = train_selected(
            spec,
            table,
            frames.train,
            frames.val,
            callbacks=callbacks,
            checkpoints=store,
            resume=resume,
        )
        spec = selection.spec
    else:
        trained = train_frames(
            spec,
            table,
            frames.train,
            frames.val,
            callbacks=callbacks,
            checkpoints=store,
            resume=resume,
            kfold_epochs=True,
            executor=executor,
        )
    metrics = _score(trained, frames, spec.data.target)
    trained.model.cpu()
    training = _training_record(spec, trained, seconds=time.perf_counter() - started)
    if selection is not None:
        training.selection = _selection_record(selection)
    meta = _manifest(spec, table, frames, trained, metrics, training, written=written)
    bundle = Bundle(meta, trained.model, trained.preprocessor)
    _save(bundle, out, store)
    return bundle


def _fit_generation(
    spec: Spec,
    out: str | Path | None,
    resume: bool,
    callbacks: Sequence[Callback],
    checkpoints: str | Path | CheckpointStore | None,
    executor: Executor | None,
) -> LMBundle:
    from kiln.lm_workflow import fit_lm

    store = _checkpoint_store(checkpoints, out)
    bundle = fit_lm(spec, callbacks=callbacks, checkpoints=store, resume=resume, executor=executor)
    _save(bundle, out, store)
    return bundle


def _fit_streaming(
    spec: Spec,
    out: str | Path | None,
    resume: bool,
    callbacks: Sequence[Callback],
    checkpoints: str | Path | CheckpointStore | None,
    executor: Executor | None,
) -> Bundle:
    """``data.streaming``: train from the Parquet source in batches; the manifest is
    the holdout one's, its reference from a sample of training rows."""
    from kiln.train.stream_recipe import fit_streaming

    started = time.perf_counter()
    store = _checkpoint_store(checkpoints, out)
    fitted = fit_streaming(
        spec, callbacks=callbacks, checkpoints=store, resume=resume, executor=executor
    )
    trained, columns, counts = fitted.trained, fitted.columns, fitted.counts
    trained.model.cpu()
    lineage = Lineage(
        spec=spec.model_dump(mode="json"),
        data=DataRecord(
            source=absolute_source(spec.data.source),
            fingerprint=fitted.fingerprint,
            rows_read=fitted.rows_read,
            rows_dropped=fitted.rows_dropped,
        ),
        split=SplitRecord(train=counts.train, val=counts.val, test=counts.test),
        parent=None,
    )
    meta = new_meta(
        name=spec.name,
        task=spec.task,
        model=spec.model.model_dump(mode="json"),
        input_schema=columns,
        reference=reference_stats(fitted.reference, [(c.name, c.kind) for c in columns]),
        target=spec.data.target,
        labels=fitted.labels,
        n_inputs=trained.preprocessor.n_outputs,
        model_context=trained.context,
        n_outputs=len(fitted.labels) if fitted.labels is not None else 1,
        parameters=count_parameters(trained.model),
        metrics=fitted.metrics,
        training=_training_record(spec, trained, seconds=time.perf_counter() - started),
        lineage=lineage,
    )
    bundle = Bundle(meta, trained.model, trained.preprocessor)
    _save(bundle, out, store)
    return bundle


@dataclass(frozen=True)
class _Frames:
    """The table's holdout split: the row positions and their frames (val and test
    are None when empty)."""

    parts: Holdout
    train: pd.DataFrame
    val: pd.DataFrame | None
    test: pd.DataFrame | None

    @classmethod
    def split(cls, spec: Spec, table: Table) -> _Frames:
        stratify = spec.task == "classification" and spec.data.split.stratify
        parts = holdout(table.frame[spec.data.target], spec.data.split, stratify)
        frame = table.frame
        return cls(
            parts=parts,
            train=frame.iloc[parts.train],
            val=frame.iloc[parts.val] if len(parts.val) else None,
            test=frame.iloc[parts.test] if len(parts.test) else None,
        )


def _save(bundle: Bundle | LMBundle, out: str | Path | None, store: CheckpointStore | None) -> None:
    """Save ``bundle`` to ``out`` (if given); its checkpoints are not needed after that."""
    if out is None:
        return
    bundle.save(out)
    if store is not None:
        store.clear()


def _checkpoint_store(
    checkpoints: str | Path | CheckpointStore | None, out: str | Path | None
) -> CheckpointStore | None:
    """A directory becomes a store; without one, a saved bundle checkpoints beside ``out``."""
    if isinstance(checkpoints, str | Path):
        return DirCheckpoints(checkpoints)
    if checkpoints is not None:
        return checkpoints  # e.g. the job queue's checkpoints in the artifact store
    if out is not None:
        return DirCheckpoints(checkpoint_dir(out))
    return None


def _score(trained: Trained, frames: _Frames, target: str) -> SplitMetrics:
    """Metrics per held-out split present, ``test`` first."""
    metrics: SplitMetrics = {}
    model, pre = trained.model, trained.preprocessor
    if frames.test is not None:
        metrics["test"] = score_frame(model, pre, frames.test, target)
    # after k-fold early stopping the model trained on the val rows: not validation
    if frames.val is not None and trained.result.epoch_choice is None:
        metrics["val"] = score_frame(model, pre, frames.val, target)
    return metrics


def _training_record(spec: Spec, trained: Trained, *, seconds: float) -> TrainingRecord:
    result = trained.result
    return TrainingRecord(
        epochs_run=result.epochs_run,
        best_epoch=result.best_epoch,
        stopped_early=result.stopped_early,
        resumed_from_epoch=result.resumed_from,
        seconds=round(seconds, 3),
        device=result.device,
        loss=spec.resolved_loss,
        history=result.history,
        epoch_choice=_epoch_choice_record(result.epoch_choice),
    )


def _lineage(spec: Spec, table: Table, parts: Holdout) -> Lineage:
    doc = spec.model_dump(mode="json")
    # The recorded spec must train the same model again: the preprocessing the model
    # was fitted with (gbdt: native defaults where unset); for auto, only what was set
    # (each candidate takes its own defaults for the rest); for gbdt, only the model
    # settings given (xgboost's defaults depend on which are set).
    auto = spec.model.type == "auto"
    doc["data"]["preprocessing"] = spec.preprocessing.model_dump(mode="json", exclude_unset=auto)
    if spec.model.type == "gbdt":
        given = spec.model.model_dump(mode="json", exclude_unset=True)
        doc["model"] = {"type": "gbdt", **given}
    return Lineage(
        spec=doc,
        data=DataRecord(
            source=absolute_source(spec.data.source),
            fingerprint=table.fingerprint,
            rows_read=table.rows_read,
            rows_dropped=table.rows_dropped,
        ),
        split=SplitRecord(train=len(parts.train), val=len(parts.val), test=len(parts.test)),
        parent=None,
    )


def _manifest(
    spec: Spec,
    table: Table,
    frames: _Frames,
    trained: Trained,
    metrics: SplitMetrics,
    training: TrainingRecord,
    *,
    written: Spec | None = None,
) -> BundleMeta:
    """The trained bundle's manifest: its schema, metrics, training record and lineage
    (whose spec is ``written``, the spec as given, where it differs from ``spec``, the
    one trained: an auto spec and its winner)."""
    columns = table.columns
    return new_meta(
        name=spec.name,
        task=spec.task,
        model=spec.model.model_dump(mode="json"),
        input_schema=columns,
        reference=reference_stats(frames.train, [(c.name, c.kind) for c in columns]),
        target=spec.data.target,
        labels=table.labels,
        n_inputs=trained.preprocessor.n_outputs,
        model_context=trained.context,
        n_outputs=len(table.labels) if table.labels is not None else 1,
        parameters=count_parameters(trained.model),
        metrics=metrics,
        training=training,
        lineage=_lineage(written or spec, table, frames.parts),
    )


def _selection_record(selection: Selection) -> SelectionRecord:
    """An auto spec's model selection as the manifest's ``training.selection``."""
    return SelectionRecord(
        metric=selection.metric,
        method=selection.method,
        folds=selection.folds,
        candidates=[
            CandidateRecord(
                type=c.type, score=c.score, std=c.std, log_loss=c.log_loss, seconds=c.seconds
            )
            for c in selection.candidates
        ],
        winner=selection.winner,
    )


def _epoch_choice_record(choice: EpochChoice | None) -> EpochChoiceRecord | None:
    """k-fold early stopping's choice as the manifest's ``training.epoch_choice``."""
    if choice is None:
        return None
    return EpochChoiceRecord(
        folds=choice.folds,
        metric=choice.metric,
        best_epoch=choice.best_epoch,
        best_value=choice.best_value,
        mean_curve=choice.mean_curve,
        seconds=round(choice.seconds, 3),
    )
