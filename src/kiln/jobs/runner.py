"""Running one claimed job: train, crossval or evaluate, then close it in the database.

The runner turns a job row into calls of the ML core (``kiln.fit``, ``kiln.crossval``,
``Bundle.evaluate``) with the job's dataset copied out of the artifact store, reports
every epoch to the queue, checkpoints into the artifact store (so a re-queued job
resumes on any worker), and for a train job stores the bundle and registers the
model version in the same transaction that marks the job succeeded (run again when a
concurrent registration took the version number; the job fails with a 409-style
``conflict`` error once :func:`kiln.store.registry.registering` gives up). That transaction
also writes the attempt's measured resources and meters its compute seconds
(:mod:`kiln.jobs.resources`), whatever the outcome.
"""

from __future__ import annotations

import copy
import tempfile
import threading
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from kiln.errors import ConflictError, DataError, KilnError, NotFoundError, ToleranceError
from kiln.jobs.checkpoints import ArtifactCheckpoints
from kiln.jobs.queue import EpochLogs, ErrorRecord, Lease, LeaseLost, Queue, epoch_series
from kiln.jobs.resources import RELEASED, ResourceMeter, account
from kiln.jobs.results import (
    CompressJobResult,
    JobResult,
    TrainSummary,
    VariantResult,
    VariantSummary,
    VersionResult,
)
from kiln.lifecycle import JobState
from kiln.manifest import BundleMeta, JSONDocument, ParentRecord
from kiln.store.artifacts import ArtifactStore, safe_key
from kiln.store.datasets import archive_root, dataset_ref
from kiln.store.db import Database
from kiln.store.model_refs import Pins, pin_spec
from kiln.store.registry import get_model, register_version, registering, resolve_version
from kiln.store.tables import Dataset, Job, Project
from kiln.train.callbacks import Callback

if TYPE_CHECKING:
    from kiln.compress.pipeline import Variant
    from kiln.store.tables import ModelVersion


class JobStopped(Exception):  # noqa: N818 - a request, not a failure
    """Raised inside training when the job must stop (cancelled, lease lost, shutdown)."""


@dataclass
class JobContext:
    """What a running job may touch, and the flag that stops it."""

    db: Database
    store: ArtifactStore
    queue: Queue
    lease: Lease
    stop: threading.Event = field(default_factory=threading.Event)
    reason: str = ""  # "cancelled" | "lease_lost" | "shutdown"
    meter: ResourceMeter = field(default_factory=ResourceMeter)  # started with the attempt
    scratch: Path | None = None  # where the job's temporary folder goes (None: the system's)

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.reason = reason
            self.stop.set()


class _JobCheckpoints(ArtifactCheckpoints):
    """Also remembers the per-epoch logs of the checkpoint it loaded."""

    def __init__(self, store: ArtifactStore, key: str) -> None:
        super().__init__(store, key)
        self.history: list[EpochLogs] = []

    def load(self) -> dict[str, Any] | None:
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
        if self.ctx.stop.is_set():
            raise JobStopped(self.ctx.reason)

    def on_epoch_end(self, logs: EpochLogs) -> None:
        if not self.record:
            self.on_batch_end()
            return
        try:
            self.ctx.queue.record_epoch(self.ctx.lease, logs, self.total)
        except LeaseLost:
            self.ctx.request_stop("lease_lost")
        self.on_batch_end()


def run(ctx: JobContext, job: Job) -> JobState | None:
    """Run ``job`` to its end and record the outcome; None when the lease was lost."""
    try:
        with tempfile.TemporaryDirectory(prefix=f"kiln-{job.id}-", dir=ctx.scratch) as tmp:
            if job.kind == "train":
                _train(ctx, job, Path(tmp))
                return JobState.succeeded
            if job.kind == "crossval":
                result = _crossval(ctx, job, Path(tmp))
            elif job.kind == "evaluate":
                result = _evaluate(ctx, job, Path(tmp))
            elif job.kind == "compress":
                return _compress(ctx, job, Path(tmp))
            else:
                raise KilnError(f"unknown job kind {job.kind!r}", field="kind")
            _finish(ctx, JobState.succeeded, result=result)
            return JobState.succeeded
    except JobStopped:
        if ctx.reason == "cancelled":
            _finish(ctx, JobState.cancelled)
            return JobState.cancelled
        if ctx.reason == "shutdown":
            # billed now: the attempt used the machine, though the job is not over
            with ctx.db.session() as session:
                account(session, ctx.lease, ctx.meter.snapshot(), RELEASED)
            ctx.queue.release(ctx.lease, "the worker is shutting down; it resumes later")
        return None
    except LeaseLost:
        # the worker that re-queued the job billed this attempt up to its last heartbeat
        return None
    except KilnError as exc:
        _finish(ctx, JobState.failed, error=exc.to_dict())
        return JobState.failed
    except Exception as exc:  # a bug or an environment failure: keep the trace in the log
        ctx.queue.log(ctx.lease, "error", traceback.format_exc(limit=8))
        error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}", "field": None}
        _finish(ctx, JobState.failed, error=error)
        return JobState.failed


def checkpoint_key(project: str, job_id: str) -> str:
    """Where a train job's latest checkpoint lives in the artifact store."""
    return safe_key("projects", project, "jobs", job_id, "checkpoint.pt")


def _close(
    ctx: JobContext,
    session: Session,
    state: JobState,
    *,
    result: JobResult | None = None,
    error: ErrorRecord | None = None,
    model_version_id: str | None = None,
) -> None:
    """End the attempt in the caller's transaction: its resources, its metered compute
    and the job's new state commit together. Raises LeaseLost."""
    account(session, ctx.lease, ctx.meter.snapshot(), state.value)
    ctx.queue.finish(
        session,
        ctx.lease,
        state,
        result=dict(result) if result is not None else None,
        error=error,
        model_version_id=model_version_id,
    )


def _finish(
    ctx: JobContext,
    state: JobState,
    *,
    result: JobResult | None = None,
    error: ErrorRecord | None = None,
) -> None:
    """Close the attempt in a transaction of its own; a failed or cancelled job's
    checkpoint goes with it."""
    try:
        with ctx.db.session() as session:
            _close(ctx, session, state, result=result, error=error)
            job = session.get(Job, ctx.lease.job_id)
            project = session.get(Project, job.project_id) if job is not None else None
        if state != JobState.succeeded and project is not None:
            # a failed or cancelled job never resumes: its checkpoint would only take space
            ctx.store.delete(checkpoint_key(project.name, ctx.lease.job_id))
    except LeaseLost:
        pass  # a newer attempt owns the job now


def _project(ctx: JobContext, job: Job) -> Project:
    with ctx.db.session() as session:
        project = session.get(Project, job.project_id)
    assert project is not None
    return project


def _fetch_dataset(ctx: JobContext, job: Job, source: str, tmp: Path) -> tuple[str, Dataset | None]:
    """A local path for a spec's data source: ``dataset:<id>`` is copied out of the store
    into ``_data_dir(tmp)``; an archive's files into a folder of their own there."""
    dataset_id = dataset_ref(source)
    if dataset_id is None:
        return source, None
    with ctx.db.session() as session:
        dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.project_id != job.project_id:
        raise NotFoundError(f"dataset {dataset_id} not found", field="spec.data.source")
    root = archive_root(dataset)
    if root is not None:  # an image folder, or a table at the top beside its images
        folder = _data_dir(tmp) / dataset.id
        ctx.store.get_dir(root, folder)
        return str(folder.joinpath(*dataset.artifact_key[len(root) :].split("/"))), dataset
    local = _data_dir(tmp) / dataset.artifact_key.rsplit("/", 1)[-1]
    local.parent.mkdir(parents=True, exist_ok=True)
    ctx.store.get_file(dataset.artifact_key, local)
    return str(local), dataset


def _data_dir(tmp: Path) -> Path:
    """Where a job's datasets are copied; the only folder its image paths may name."""
    return tmp / "data"


def _train(ctx: JobContext, job: Job, tmp: Path) -> None:
    from kiln.workflow import fit

    project = _project(ctx, job)
    spec = copy.deepcopy(job.spec)
    # base:<name> / model:<name>@<v> -> a verified local folder
    pins = pin_spec(ctx.db, ctx.store, spec, tmp, project_id=job.project_id)
    spec["data"]["source"], dataset = _fetch_dataset(ctx, job, spec["data"]["source"], tmp)
    checkpoints = _JobCheckpoints(ctx.store, checkpoint_key(project.name, job.id))
    bundle = fit(
        spec,
        callbacks=[_Reporter(ctx, checkpoints=checkpoints)],
        checkpoints=checkpoints,
        resume=checkpoints.exists(),
        data_root=_data_dir(tmp),
    )
    ctx.meter.device = bundle.meta.training.device
    _name_sources(bundle.meta, job, project, pins)
    out = bundle.save(tmp / "bundle")
    prefix = safe_key("projects", project.name, "models", bundle.meta.name, job.id)
    ctx.store.put_dir(prefix, out)
    stored = _StoredBundle(bundle.meta, prefix, _size(out))
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


def _name_sources(meta: BundleMeta, job: Job, project: Project, pins: Pins) -> None:
    """Point the trained bundle's manifest at what the job named: the dataset and the
    base model, not the worker's temporary copies of them; and at the job."""
    source = job.spec["data"]["source"]
    lineage = meta.lineage
    if lineage.data is not None:
        lineage.data.source = source
    if lineage.spec is not None:
        lineage.spec["data"] = {**_mapping(lineage.spec["data"]), "source": source}
    meta.lineage = pins.restore_model(lineage)
    meta.model = pins.restore_model(meta.model)
    pins.restore(meta.model_context)
    meta.lineage.job = job.id
    meta.lineage.project = project.name


@dataclass(frozen=True)
class _StoredBundle:
    """A bundle put in the artifact store under ``prefix``, not registered yet."""

    meta: BundleMeta
    prefix: str
    size_bytes: int


def _size(folder: Path) -> int:
    """The bytes of a saved bundle's files."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


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
    summary = TrainSummary(
        model=meta.model.type,
        parameters=meta.parameters,
        epochs_run=meta.training.epochs_run,
        seconds=meta.training.seconds,
        device=meta.training.device,
    )
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
    _close(ctx, session, JobState.succeeded, result=result, model_version_id=version.id)


def _crossval(ctx: JobContext, job: Job, tmp: Path) -> JobResult:
    from kiln.train.crossval import crossval

    spec = copy.deepcopy(job.spec)
    pin_spec(ctx.db, ctx.store, spec, tmp, project_id=job.project_id)
    spec["data"]["source"], _ = _fetch_dataset(ctx, job, spec["data"]["source"], tmp)
    folds = int(job.options.get("folds", 5))

    def on_fold(i: int, metrics: Mapping[str, object]) -> None:
        ctx.queue.log(ctx.lease, "info", f"fold {i + 1}/{folds}: {metrics}")
        ctx.queue.set_progress(ctx.lease, {"fold": i + 1, "folds": folds})

    result = crossval(
        spec,
        folds,
        on_fold=on_fold,
        callbacks=lambda i: [_Reporter(ctx, f"fold {i + 1}: ", record=False)],
        data_root=_data_dir(tmp),
    )
    return result.to_dict()


def _evaluate(ctx: JobContext, job: Job, tmp: Path) -> VersionResult:
    from kiln.bundle import Bundle

    project = _project(ctx, job)
    name, ref, source = job.spec["model"], job.spec["version"], job.spec["data"]
    with ctx.db.session() as session:
        model = get_model(session, project, name)
        version = resolve_version(session, model, ref)
    local, _ = _fetch_dataset(ctx, job, source, tmp)
    ctx.store.get_dir(version.artifact_key, tmp / "bundle")
    metrics = Bundle.load(tmp / "bundle").evaluate(local, data_root=_data_dir(tmp))
    return VersionResult(model=name, version=version.version, metrics=metrics)


MODEL_PREFIX = "model:"


def parse_model_ref(ref: str) -> tuple[str, str]:
    """``model:<name>[@<version>]`` → (name, version); the version defaults to ``latest``."""
    body = ref.removeprefix(MODEL_PREFIX)
    name, _, version = body.partition("@")
    return name, version or "latest"


def _compress(ctx: JobContext, job: Job, tmp: Path) -> JobState:
    """Compress a registered version; every variant becomes a new version of the same
    model whose parent is the version it was made from (step by step)."""
    project = _project(ctx, job)
    spec = copy.deepcopy(job.spec)
    # a pretrained student's base model (or earlier version)
    pins = pin_spec(ctx.db, ctx.store, spec, tmp, project_id=job.project_id)
    name, ref = parse_model_ref(spec["source"])
    with ctx.db.session() as session:
        source = resolve_version(session, get_model(session, project, name), ref)
    ctx.store.get_dir(source.artifact_key, tmp / "source")
    spec["source"] = str(tmp / "source")
    data = _compress_data(spec.get("data"), tmp / "source")
    if data is not None:
        spec["data"], _ = _fetch_dataset(ctx, job, data, tmp)
    variants, failure = _run_compress(ctx, spec, tmp)
    if ctx.stop.is_set():
        raise JobStopped(ctx.reason)
    registration = _VariantRegistration(
        ctx, job, project, name, source, pins, tmp / "register", variants, failure
    )
    try:
        return registering(ctx.db, name, registration)
    except ConflictError:
        # registered nowhere: the bundles' bytes would only take space
        for prefix in set(registration.prefixes):
            ctx.store.delete(prefix)
        raise


def _compress_data(data: str | None, source: Path) -> str | None:
    """The data source a compress job measures on: the spec's, else the ``source``
    bundle's own training data when it came from a dataset of this project; None for
    scikit-learn's tables (compress loads them again) and for none at all."""
    from kiln.bundle import Bundle

    if data is not None:
        return data
    trained_on = Bundle.load(source).meta.lineage.data
    data = trained_on.source if trained_on is not None else None
    if data is None or dataset_ref(data) is not None:
        return data
    if not data.startswith("sklearn:"):
        # a path or URI of the machine that trained it (a bundle made by
        # `kiln serve`, say): a server job reads only this project's datasets
        raise DataError(
            "the source version was not trained on a dataset of this server: "
            "give the compress spec data: dataset:<id>",
            field="spec.data",
        )
    return None  # compress loads the scikit-learn table again


def _run_compress(
    ctx: JobContext, spec: JSONDocument, tmp: Path
) -> tuple[list[Variant], ToleranceError | None]:
    """Run the compress spec: its variants, and the tolerance error that stopped it
    early (the variants are then those that fitted before it)."""
    from kiln.compress.pipeline import CompressToleranceError, compress

    failure: ToleranceError | None = None
    try:
        result = compress(
            spec,
            tmp / "variants",
            on_event=lambda m: ctx.queue.log(ctx.lease, "info", m),
            data_root=_data_dir(tmp),
        )
        variants = result.variants
    except ToleranceError as exc:
        failure = exc
        partial = exc.partial if isinstance(exc, CompressToleranceError) else None
        variants = partial.variants if partial is not None else []
    return variants, failure


@dataclass
class _VariantRegistration:
    """Registers a compress job's variants, each a new version whose parent is the one
    before it, and ends the job, in one transaction. Run again on a lost race: each
    variant's lineage names its parent's version number, known only inside this
    transaction, so the bundles are saved here."""

    ctx: JobContext
    job: Job
    project: Project
    name: str  # the model: the source's, and every variant's
    source: ModelVersion
    pins: Pins
    folder: Path  # where the bundles are saved before they are stored
    variants: list[Variant]
    failure: ToleranceError | None
    prefixes: list[str] = field(default_factory=list)  # stored: deleted if registering fails

    def __call__(self, session: Session) -> JobState:
        parent = session.get(type(self.source), self.source.id)
        assert parent is not None
        registered: list[VariantResult] = []
        for variant in self.variants:
            version = self._register(session, variant, parent)
            registered.append(VariantResult(variant=variant.name, version=version.version))
            parent = version
        outcome = CompressJobResult(
            model=self.name, source_version=self.source.version, variants=registered
        )
        if self.failure is None:
            _close(self.ctx, session, JobState.succeeded, result=outcome)
            return JobState.succeeded
        _close(self.ctx, session, JobState.failed, result=outcome, error=self.failure.to_dict())
        return JobState.failed

    def _register(self, session: Session, variant: Variant, parent: ModelVersion) -> ModelVersion:
        """Save ``variant`` as a child of ``parent``, store it and register it."""
        meta = variant.bundle.meta
        meta.model = self.pins.restore_model(meta.model)
        self.pins.restore(meta.model_context)
        # name the registered parent instead of a worker's temporary folder
        meta.lineage.parent = (meta.lineage.parent or ParentRecord()).model_copy(
            update={"path": None, "model": self.name, "version": parent.version, "id": parent.id}
        )
        meta.lineage.job = self.job.id
        out = variant.bundle.save(self.folder / variant.name)
        prefix = safe_key(
            "projects", self.project.name, "models", self.name, self.job.id, variant.name
        )
        self.ctx.store.put_dir(prefix, out)
        self.prefixes.append(prefix)
        summary = VariantSummary(
            model=meta.model.type,
            parameters=meta.parameters,
            variant=variant.name,
            runtime=meta.runtime.model_dump(mode="json"),
            report=variant.report,
        )
        return register_version(
            session,
            self.project,
            self.name,
            artifact_key=prefix,
            task=meta.task,
            metrics=meta.metrics,
            summary=dict(summary),
            size_bytes=_size(out),
            job_id=self.job.id,
            dataset_id=parent.dataset_id,
            parent_id=parent.id,
        )


def _mapping(value: object) -> JSONDocument:
    """A JSON object from a recorded spec (a lineage written by kiln always has one)."""
    if not isinstance(value, dict):
        raise DataError("the bundle's lineage spec has no data section", field="data")
    return value
