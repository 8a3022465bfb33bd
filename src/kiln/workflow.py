"""``kiln.fit``: from a spec to a trained, evaluated bundle (holdout split)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.bundle import Bundle, check_destination, new_meta
from kiln.data.split import holdout
from kiln.models.summary import count_parameters
from kiln.monitor.drift import reference_stats
from kiln.spec.load import load_spec
from kiln.spec.spec import Spec
from kiln.train.callbacks import Callback
from kiln.train.checkpoint import CheckpointStore, DirCheckpoints
from kiln.train.recipe import load_table, score_frame, train_frames


def checkpoint_dir(out: str | Path) -> Path:
    """Where ``kiln train --out DIR`` keeps its checkpoints: a hidden sibling of DIR."""
    out = Path(out)
    return out.with_name(f".{out.name}.ckpt")


def fit(
    spec: Spec | dict[str, Any] | str | Path,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    checkpoints: str | Path | CheckpointStore | None = None,
    data_root: Path | None = None,
) -> Bundle:
    """Train the model a spec describes and return its bundle.

    The table is split into train/val/test; preprocessing is fitted on train only;
    test metrics are measured once at the end. With ``out`` the bundle is saved there
    (atomically) and a checkpoint is written after every epoch to ``checkpoints``
    (a directory or any ``CheckpointStore``; default: a hidden sibling of ``out``),
    removed once the bundle is saved; ``resume=True`` continues from it. ``data_root``
    (a server's dataset folder) confines image paths to it.
    """
    spec = load_spec(spec)
    if out is not None:
        check_destination(Path(out))  # fail before training, not after
    started = time.perf_counter()
    table = load_table(spec, data_root=data_root)
    target = spec.data.target
    stratify = spec.task == "classification" and spec.data.split.stratify
    parts = holdout(table.frame[target], spec.data.split, stratify)
    train_df = table.frame.iloc[parts.train]
    val_df = table.frame.iloc[parts.val] if len(parts.val) else None
    test_df = table.frame.iloc[parts.test] if len(parts.test) else None

    store: CheckpointStore | None = None
    if isinstance(checkpoints, str | Path):
        store = DirCheckpoints(checkpoints)
    elif checkpoints is not None:
        store = checkpoints  # e.g. the job queue's checkpoints in the artifact store
    elif out is not None:
        store = DirCheckpoints(checkpoint_dir(out))
    trained = train_frames(
        spec, table, train_df, val_df, callbacks=callbacks, checkpoints=store, resume=resume
    )
    model, pre, result = trained.model, trained.preprocessor, trained.result

    metrics: dict[str, Any] = {}
    if test_df is not None:
        metrics["test"] = score_frame(model, pre, test_df, target)
    if val_df is not None:
        metrics["val"] = score_frame(model, pre, val_df, target)

    model.cpu()
    meta = new_meta(
        name=spec.name,
        task=spec.task,
        model=spec.model.model_dump(mode="json"),
        input_schema=table.columns,
        reference=reference_stats(train_df, [(c.name, c.kind) for c in table.columns]),
        target=target,
        labels=table.labels,
        n_inputs=pre.n_outputs,
        model_context=trained.context,
        n_outputs=len(table.labels) if table.labels is not None else 1,
        parameters=count_parameters(model),
        metrics=metrics,
        training={
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "resumed_from_epoch": result.resumed_from,
            "seconds": round(time.perf_counter() - started, 3),
            "device": result.device,
            "loss": spec.resolved_loss,
            "history": result.history,
        },
        lineage={
            "spec": spec.model_dump(mode="json"),
            "data": {
                "source": _absolute(spec.data.source),
                "fingerprint": table.fingerprint,
                "rows_read": table.rows_read,
                "rows_dropped": table.rows_dropped,
            },
            "split": {
                "train": len(parts.train),
                "val": len(parts.val),
                "test": len(parts.test),
            },
            "parent": None,
        },
    )
    bundle = Bundle(meta, model, pre)
    if out is not None:
        bundle.save(out)
        if store is not None:
            store.clear()
    return bundle


def _absolute(source: str) -> str:
    """Local paths become absolute (so the lineage still finds them from elsewhere)."""
    if "://" in source or source.startswith("sklearn:") or not Path(source).exists():
        return source
    return str(Path(source).resolve())
