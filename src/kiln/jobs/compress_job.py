"""The compress job: a compress spec run on a registered version, each variant that fits
registered as a new version of the same model whose parent is the version it was made
from (step by step), in the transaction that ends the job.

A tolerance error that stops the spec early still registers the variants made before
it, and fails the job with that error.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from kiln.errors import ConflictError, DataError, ToleranceError
from kiln.jobs.context import (
    JobContext,
    close_attempt,
    data_dir,
    fetch_dataset,
    folder_size,
    job_project,
)
from kiln.jobs.results import CompressJobResult, VariantResult, VariantSummary
from kiln.lifecycle import JobState
from kiln.manifest import JSONDocument, ParentRecord
from kiln.store.artifacts import safe_key
from kiln.store.datasets import dataset_ref
from kiln.store.model_refs import Pins, pin_spec
from kiln.store.registry import get_model, register_version, registering, resolve_version
from kiln.store.tables import Job, Project

if TYPE_CHECKING:
    from kiln.compress.pipeline import Variant
    from kiln.store.tables import ModelVersion

MODEL_PREFIX = "model:"


def parse_model_ref(ref: str) -> tuple[str, str]:
    """``model:<name>[@<version>]`` → (name, version); the version defaults to ``latest``."""
    body = ref.removeprefix(MODEL_PREFIX)
    name, _, version = body.partition("@")
    return name, version or "latest"


def run_compress(ctx: JobContext, job: Job, tmp: Path) -> JobState:
    """Compress a registered version and register its variants; the job's end state
    (failed when a tolerance stopped the spec early)."""
    project = job_project(ctx, job)
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
        spec["data"], _ = fetch_dataset(ctx, job, data, tmp)
    variants, failure = _run_spec(ctx, spec, tmp)
    ctx.raise_if_stopped()
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
    from kiln.lm_bundle_files import read_verified_manifest

    if data is not None:
        return data
    # the manifest alone: a generation bundle has no preprocess.json for Bundle.load
    trained_on = read_verified_manifest(Path(source)).lineage.data
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


def _run_spec(
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
            data_root=data_dir(tmp),
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
            close_attempt(self.ctx, session, JobState.succeeded, result=outcome)
            return JobState.succeeded
        error = self.failure.to_dict()
        close_attempt(self.ctx, session, JobState.failed, result=outcome, error=error)
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
            size_bytes=folder_size(out),
            job_id=self.job.id,
            dataset_id=parent.dataset_id,
            parent_id=parent.id,
        )
