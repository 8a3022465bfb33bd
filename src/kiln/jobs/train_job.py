"""The train, crossval and evaluate jobs: calls of the ML core (``kiln.fit``,
``kiln.crossval``, ``Bundle.evaluate``) on the job's dataset copied out of the artifact
store.

Training reports every epoch to the queue and checkpoints into the artifact store (so a
re-queued job resumes on any worker); a train job stores its bundle and registers the
model version in the same transaction that marks the job succeeded, run again when a
concurrent registration took the version number (the job fails with a 409-style
``conflict`` error once :func:`kiln.store.registry.registering` gives up).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from kiln.errors import ConflictError, DataError, NotFoundError, SpecError
from kiln.jobs.checkpoints import ArtifactCheckpoints
from kiln.jobs.context import (
    JobContext,
    checkpoint_key,
    close_attempt,
    data_dir,
    fetch_dataset,
    folder_size,
    job_project,
)
from kiln.jobs.queue import EpochLogs, LeaseLost, epoch_series
from kiln.jobs.results import JobResult, TrainedVersionSummary, VersionResult
from kiln.lifecycle import JobState
from kiln.manifest import BundleMeta, JSONDocument
from kiln.store.artifacts import ArtifactStore, safe_key
from kiln.store.datasets import dataset_ref
from kiln.store.model_refs import Pins, pin_spec
from kiln.store.registry import get_model, register_version, registering, resolve_version
from kiln.store.tables import Job, Project
from kiln.train.callbacks import Callback
from kiln.train.checkpoint import CheckpointState


class _JobCheckpoints(ArtifactCheckpoints):
    """Also remembers the per-epoch logs of the checkpoint it loaded."""

    def __init__(self, store: ArtifactStore, key: str) -> None:
        super().__init__(store, key)
        self.history: list[EpochLogs] = []

    def load(self) -> CheckpointState | None:
        state = super().load()
        self.history = list(state.get("history") or []) if state is not None else []
        return state


class _Reporter(Callback):
    """Sends each epoch to the queue and stops training when asked to."""

    def __init__(
        self,
        ctx: JobContext,
        label: str = "",
        *,
        record: bool = True,
        checkpoints: _JobCheckpoints | None = None,
    ) -> None:
        self.ctx = ctx
        self.label = label
        self.record = record  # crossval folds repeat epoch numbers: progress is per fold
        self.checkpoints = checkpoints
        self.total = 0

    def on_train_start(self, epochs: int, start_epoch: int) -> None:
        self.total = epochs
        if start_epoch:
            self.ctx.queue.log(
                self.ctx.lease,
                "info",
                f"{self.label}resumed from the checkpoint of epoch {start_epoch}",
            )
            if self.record and self.checkpoints is not None:
                self._record_missed(self.checkpoints.history)

    def _record_missed(self, history: Sequence[EpochLogs]) -> None:
        """Record the checkpointed epochs the series lacks: a worker that died after
        writing an epoch's checkpoint but before recording the epoch left it out."""
        with self.ctx.db.session() as session:
            recorded = {e["epoch"] for e in epoch_series(session, self.ctx.lease.job_id)}
        for logs in history:
            if int(logs["epoch"]) not in recorded:
                self.ctx.queue.record_epoch(self.ctx.lease, logs, self.total)

    def on_batch_end(self) -> None:
        self.ctx.raise_if_stopped()

    def on_epoch_end(self, logs: EpochLogs) -> None:
        if not self.record:
            self.on_batch_end()
            return
        try:
            self.ctx.queue.record_epoch(self.ctx.lease, logs, self.total)
        except LeaseLost:
            self.ctx.request_stop("lease_lost")
        self.on_batch_end()


def run_train(ctx: JobContext, job: Job, tmp: Path) -> None:
    """Fit the job's spec (resuming from its checkpoint), store the bundle and register
    it as a new version; the job succeeds in that transaction."""
    from kiln.workflow import fit

    project = job_project(ctx, job)
    spec = copy.deepcopy(job.spec)
    # base:<name> / model:<name>@<v> -> a verified local folder
    pins = pin_spec(ctx.db, ctx.store, spec, tmp, project_id=job.project_id)
    spec["data"]["source"], dataset = fetch_dataset(ctx, job, spec["data"]["source"], tmp)
    _fetch_validation(ctx, job, spec, tmp)
    checkpoints = _JobCheckpoints(ctx.store, checkpoint_key(project.name, job.id))
    bundle = fit(
        spec,
        callbacks=[_Reporter(ctx, checkpoints=checkpoints)],
        checkpoints=checkpoints,
        resume=checkpoints.exists(),
        data_root=data_dir(tmp),
        executor=ctx.executor,
    )
    ctx.meter.device = bundle.meta.training.device
    _name_sources(bundle.meta, job, project, pins)
    out = bundle.save(tmp / "bundle")
    prefix = safe_key("projects", project.name, "models", bundle.meta.name, job.id)
    ctx.store.put_dir(prefix, out)
    stored = _StoredBundle(bundle.meta, prefix, folder_size(out), _importance(bundle.model))
    dataset_id = dataset.id if dataset else None
    try:
        registering(
            ctx.db,
            bundle.meta.name,
            lambda session: _register_trained(ctx, session, job, project, stored, dataset_id),
        )
    except ConflictError:
        ctx.store.delete(prefix)  # registered nowhere: the bundle's bytes would only take space
        raise
    checkpoints.clear()


VALIDATION_FIELD = "spec.data.validation"


def _fetch_validation(ctx: JobContext, job: Job, spec: JSONDocument, tmp: Path) -> None:
    """Point ``spec``'s ``data.validation`` (if any) at a local copy of its dataset, in
    a folder of its own (its file may share the training file's name).

    On the server it must be a ``dataset:<id>`` of the job's project, as the training
    data is: any other path names a file of the server and is refused.
    """
    data = _mapping(spec["data"])
    validation = data.get("validation")
    if validation is None:
        return
    if not isinstance(validation, str) or dataset_ref(validation) is None:
        raise SpecError(
            f"{VALIDATION_FIELD}: on the server, the validation set is an uploaded "
            "dataset (dataset:<id>, see POST /api/v1/datasets)",
            field=VALIDATION_FIELD,
        )
    try:
        data["validation"], _ = fetch_dataset(ctx, job, validation, tmp / "validation")
    except NotFoundError as exc:
        raise NotFoundError(f"{VALIDATION_FIELD}: {exc.message}", field=VALIDATION_FIELD) from None


def _name_sources(meta: BundleMeta, job: Job, project: Project, pins: Pins) -> None:
    """Point the trained bundle's manifest at what the job named: the dataset (and the
    validation dataset) and the base model, not the worker's temporary copies of them;
    and at the job."""
    named = _mapping(job.spec["data"])
    source = named["source"]
    lineage = meta.lineage
    if lineage.data is not None:
        lineage.data.source = str(source)
    if lineage.spec is not None:
        recorded = {**_mapping(lineage.spec["data"]), "source": source}
        if named.get("validation") is not None:
            recorded["validation"] = named["validation"]
        lineage.spec["data"] = recorded
    meta.lineage = pins.restore_model(lineage)
    meta.model = pins.restore_model(meta.model)
    pins.restore(meta.model_context)
    meta.lineage.job = job.id
    meta.lineage.project = project.name


def _mapping(value: object) -> JSONDocument:
    """A JSON object from a recorded spec (a lineage written by kiln always has one)."""
    if not isinstance(value, dict):
        raise DataError("the bundle's lineage spec has no data section", field="data")
    return value


@dataclass(frozen=True)
class _StoredBundle:
    """A bundle put in the artifact store under ``prefix``, not registered yet."""

    meta: BundleMeta
    prefix: str
    size_bytes: int
    importance: list[tuple[str, float]] | None = None  # gbdt: (column, gain), largest first


def _importance(model: object) -> list[tuple[str, float]] | None:
    """A tree model's feature importances for the version's summary (the dashboard
    draws them); None for other models."""
    from kiln.models.gbdt import GBDTModel

    if not isinstance(model, GBDTModel):
        return None
    return model.summary().importance


def _register_trained(
    ctx: JobContext,
    session: Session,
    job: Job,
    project: Project,
    stored: _StoredBundle,
    dataset_id: str | None,
) -> None:
    """Register the trained version and succeed the job, in one transaction: no
    succeeded job without its version."""
    meta = stored.meta
    summary = TrainedVersionSummary(
        model=meta.model.type,
        parameters=meta.parameters,
        epochs_run=meta.training.epochs_run,
        seconds=meta.training.seconds,
        device=meta.training.device,
    )
    if stored.importance is not None:
        summary["importance"] = stored.importance
    version = register_version(
        session,
        project,
        meta.name,
        artifact_key=stored.prefix,
        task=meta.task,
        metrics=meta.metrics,
        summary=dict(summary),
        size_bytes=stored.size_bytes,
        job_id=job.id,
        dataset_id=dataset_id,
    )
    result = VersionResult(model=meta.name, version=version.version, metrics=meta.metrics)
    close_attempt(ctx, session, JobState.succeeded, result=result, model_version_id=version.id)


def run_crossval(ctx: JobContext, job: Job, tmp: Path) -> JobResult:
    """K-fold cross-validation of the job's spec: the metrics per fold, no version."""
    from kiln.train.crossval import crossval

    spec = copy.deepcopy(job.spec)
    pin_spec(ctx.db, ctx.store, spec, tmp, project_id=job.project_id)
    spec["data"]["source"], _ = fetch_dataset(ctx, job, spec["data"]["source"], tmp)
    folds = int(job.options.get("folds", 5))

    def on_fold(i: int, metrics: Mapping[str, object]) -> None:
        ctx.queue.log(ctx.lease, "info", f"fold {i + 1}/{folds}: {metrics}")
        ctx.queue.set_progress(ctx.lease, {"fold": i + 1, "folds": folds})

    result = crossval(
        spec,
        folds,
        on_fold=on_fold,
        callbacks=lambda i: [_Reporter(ctx, f"fold {i + 1}: ", record=False)],
        data_root=data_dir(tmp),
    )
    return result.to_dict()


def run_evaluate(ctx: JobContext, job: Job, tmp: Path) -> VersionResult:
    """Score a registered version on a dataset; registers nothing."""
    from kiln.bundle import Bundle
    from kiln.lm_bundle import LMBundle
    from kiln.lm_bundle_files import manifest_task

    project = job_project(ctx, job)
    name, ref, source = job.spec["model"], job.spec["version"], job.spec["data"]
    with ctx.db.session() as session:
        model = get_model(session, project, name)
        version = resolve_version(session, model, ref)
    local, _ = fetch_dataset(ctx, job, source, tmp)
    ctx.store.get_dir(version.artifact_key, tmp / "bundle")
    if manifest_task(tmp / "bundle") == "generation":
        metrics = LMBundle.load(tmp / "bundle").evaluate(local).metrics
    else:
        metrics = Bundle.load(tmp / "bundle").evaluate(local, data_root=data_dir(tmp))
    return VersionResult(model=name, version=version.version, metrics=metrics)
