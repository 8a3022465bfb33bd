"""Jobs: submit (scope ``train``), follow, cancel; the spec is checked before queueing."""

from __future__ import annotations

import json

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from sqlalchemy.orm import Session

from kiln.api.deps import PageDep, ProjectDep, Reader, ServicesDep, SessionDep, Trainer
from kiln.api.schemas import (
    EvaluateSpec,
    JobIn,
    JobLogOut,
    JobMetricsOut,
    JobOut,
    Page,
    job_out,
    page_of,
)
from kiln.errors import KilnError, NotFoundError, SpecError
from kiln.jobs import queue
from kiln.lifecycle import JobState
from kiln.manifest import JSONDocument, parse_manifest
from kiln.monitor import usage
from kiln.spec.data import DataSpec
from kiln.spec.load import closest, load_spec
from kiln.store.artifacts import ArtifactStore
from kiln.store.datasets import IMAGE_FOLDER_FORMAT, column_names, dataset_ref, get_dataset
from kiln.store.db import MAX_OFFSET
from kiln.store.model_refs import check_server_path, pinned_models
from kiln.store.projects import check_name
from kiln.store.registry import get_model, resolve_version
from kiln.store.tables import Dataset, ModelVersion, Project

router = APIRouter(tags=["jobs"])


def _server_source(source: str, field: str) -> str | None:
    """The dataset id of a source a server job may read, None for ``sklearn:<name>``.

    Anything else is refused by its form alone, before the spec is validated: spec
    checks look at the local filesystem (is it an image folder?), and their answers
    must not tell a caller which paths exist on the server.
    """
    dataset_id = dataset_ref(source)
    if dataset_id is None and not source.startswith("sklearn:"):
        raise SpecError(
            f"{field}: on the server, data comes from an uploaded dataset "
            "(dataset:<id>, see POST /api/v1/datasets) or sklearn:<name>",
            field=field,
        )
    return dataset_id


def _dataset(s: Session, project: Project, source: str, field: str) -> Dataset | None:
    """The uploaded dataset ``source`` names (None for ``sklearn:<name>``); a 422 naming
    ``field`` if the project has no such dataset."""
    dataset_id = _server_source(source, field)
    if dataset_id is None:
        return None
    try:
        return get_dataset(s, project, dataset_id)
    except NotFoundError:
        raise SpecError(f"{field}: dataset {dataset_id} not found", field=field) from None


Named = list[tuple[str, str, str]]
"""(the request's field, a column it names, what the column is for: "" if the field says)."""


def _spec_columns(data: DataSpec) -> Named:
    """The columns a training spec names, each with its field."""
    named = [("spec.data.target", data.target, "")]
    named += [(f"spec.data.features.{i}", c, "") for i, c in enumerate(data.features or [])]
    if isinstance(data.text, list):
        named += [(f"spec.data.text.{i}", c, "") for i, c in enumerate(data.text)]
    elif data.text is not None:
        named += [("spec.data.text", data.text, "")]
    named += [("spec.data.image", data.image, "")] if data.image is not None else []
    return named


def _version_columns(store: ArtifactStore, version: ModelVersion, model: str) -> Named:
    """The columns evaluating ``version`` reads: its target and inputs (its manifest's)."""
    from kiln.bundle import META_FILE  # only here: kiln.bundle imports torch

    key = f"{version.artifact_key}/{META_FILE}"
    try:
        meta = parse_manifest(json.loads(store.get_bytes(key)), key)
    except (KilnError, OSError, ValueError):
        return []  # an unreadable bundle: the job reports it, with the reason
    if meta.task in ("generation", "embedding"):
        return []  # chat/completion records, not columns: the job checks them line by line
    of = f"{model} v{version.version}"
    named = [("spec.data", meta.target, f"{of}'s target")]
    return named + [("spec.data", c.name, f"an input of {of}") for c in meta.input_schema]


def _check_columns(dataset: Dataset, named: Named) -> None:
    """Every column named is one of the dataset's (as stored when it was ingested), else
    a 422 naming each missing one with the closest column, as a typo'd spec key gets.
    An image folder's label comes from its sub-folders, under any name: not checked."""
    if dataset.format == IMAGE_FOLDER_FORMAT:
        return
    columns = column_names(dataset)
    problems = [(key, col, role) for key, col, role in named if col not in columns]
    if not problems:
        return
    lines = []
    for key, col, role in problems:
        hint = closest(col, columns)
        lines.append(
            f"{key}: dataset {dataset.id} has no column {col!r}"
            + (f" ({role})" if role else "")
            + (f" (did you mean {hint!r}?)" if hint else "")
        )
    shown = ", ".join(columns[:_SHOWN]) + (", ..." if len(columns) > _SHOWN else "")
    lines.append(f"its columns: {shown}")
    raise SpecError("\n".join(lines), field=problems[0][0])


_SHOWN = 20  # columns listed in the message; a wide table is cut short


def _nested(exc: SpecError) -> SpecError:
    """The same error with its keys as the request body nests them (``spec.<key>``)."""
    field = f"spec.{exc.field}" if exc.field else "spec"
    lines = [
        f"  spec.{line[2:]}" if line.startswith("  ") else line for line in exc.message.splitlines()
    ]
    if lines and exc.field and lines[0].startswith(exc.field):
        lines[0] = f"spec.{lines[0]}"
    return SpecError("\n".join(lines), field=field)


def _checked_compress(s: Session, project: Project, spec: JSONDocument) -> JSONDocument:
    from kiln.jobs.compress_job import MODEL_PREFIX, parse_model_ref
    from kiln.spec.compress import CompressSpec
    from kiln.spec.load import load_document

    try:
        checked = load_document(CompressSpec, spec)
    except SpecError as exc:
        raise _nested(exc) from None
    _model_paths(s, project, checked.model_dump(mode="json"))  # a pretrained student's path
    if not checked.source.startswith(MODEL_PREFIX):
        raise SpecError(
            "spec.source: on the server, compress a registered version: model:<name>[@<version>]",
            field="spec.source",
        )
    name, version = parse_model_ref(checked.source)
    try:
        resolve_version(s, get_model(s, project, name), version)
    except NotFoundError as exc:
        raise SpecError(f"spec.source: {exc.message}", field="spec.source") from None
    if checked.data is not None:
        _dataset(s, project, checked.data, "spec.data")
    return spec


def _model_paths(s: Session, project: Project, spec: JSONDocument) -> None:
    """Every pretrained model path of a validated spec names a catalog entry (base:<name>)
    or a pretrained version of the project (model:<name>[@<version>]); nothing else may
    name files on the server."""
    for field, model in pinned_models(spec):
        check_server_path(s, project, model["path"], field=field, model_type=model.get("type"))


def checked_spec(s: Session, store: ArtifactStore, project: Project, body: JobIn) -> JSONDocument:
    """The job's spec, validated now so a mistake is a 422 naming the field, not a failed
    job: its dataset's columns too (an evaluation's: the version's target and inputs)."""
    if body.kind == "evaluate":
        try:
            ev = EvaluateSpec.model_validate(body.spec)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise SpecError(f"spec.{where}: {err['msg']}", field=f"spec.{where}") from None
        try:
            model = get_model(s, project, ev.model)
        except NotFoundError as exc:
            raise SpecError(f"spec.model: {exc.message}", field="spec.model") from None
        try:
            version = resolve_version(s, model, ev.version)
        except NotFoundError as exc:
            raise SpecError(f"spec.version: {exc.message}", field="spec.version") from None
        dataset = _dataset(s, project, ev.data, "spec.data")
        if dataset is not None:
            _check_columns(dataset, _version_columns(store, version, ev.model))
        return ev.model_dump()
    if body.kind == "compress":
        return _checked_compress(s, project, body.spec)
    data = body.spec.get("data")
    for key in ("source", "validation"):  # by their form, before any spec check
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, str):
            _server_source(value, f"spec.data.{key}")
    try:
        spec = load_spec(body.spec)
    except SpecError as exc:
        raise _nested(exc) from None
    check_name(spec.name, field="spec.name", what="model name")
    lora = getattr(spec.model, "lora", None)
    if spec.task == "generation" and lora is not None and not lora.merge:
        # an adapter bundle loads its base from where it was trained: on a server that
        # is a worker's temporary copy of a catalog entry
        raise SpecError(
            "spec.model.lora.merge: adapter bundles (merge: false) are trained locally "
            "for now; on the server LoRA adapters are merged into the saved weights",
            field="spec.model.lora.merge",
        )
    _model_paths(s, project, spec.model_dump(mode="json"))
    dataset = _dataset(s, project, spec.data.source, "spec.data.source")
    if spec.data.validation is not None:  # a generation spec's separate validation set
        _dataset(s, project, spec.data.validation, "spec.data.validation")
    # generation data (chat/completion JSON lines) is checked record by record by the job
    if dataset is not None and spec.task != "generation":
        _check_columns(dataset, _spec_columns(spec.data))
    return body.spec


@router.post("/jobs", status_code=201, name="jobs.submit")
def submit(
    body: JobIn,
    who: Trainer,
    project: ProjectDep,
    s: SessionDep,
    svc: ServicesDep,
    request: Request,
) -> JobOut:
    spec = checked_spec(s, svc.store, project, body)
    usage.check_job_quotas(s, project.id)
    options = {"folds": body.folds or 5} if body.kind == "crossval" else {}
    row = queue.new_job(
        s,
        project,
        body.kind,
        spec,
        max_attempts=body.max_attempts or svc.settings.max_attempts,
        created_by=who.key_id,
    )
    row.options = options
    request.state.audit_target = f"job:{row.id}"
    return job_out(s, row)


@router.get("/jobs", name="jobs.list")
def list_(
    _who: Reader,
    project: ProjectDep,
    s: SessionDep,
    page: PageDep,
    state: JobState | None = Query(default=None),
) -> Page[JobOut]:
    rows, total = queue.list_jobs(
        s, project, state=state.value if state else None, limit=page.limit, offset=page.offset
    )
    items = [job_out(s, r) for r in rows]
    return Page[JobOut](**page_of(items, total, page.limit, page.offset))


@router.get("/jobs/{job_id}", name="jobs.get")
def get(job_id: str, _who: Reader, project: ProjectDep, s: SessionDep) -> JobOut:
    return job_out(s, queue.get_job(s, project, job_id))


@router.get("/jobs/{job_id}/metrics", name="jobs.metrics")
def metrics(job_id: str, _who: Reader, project: ProjectDep, s: SessionDep) -> JobMetricsOut:
    """The per-epoch series (``epoch``, ``train_loss``, ``val_*``, ``lr``, ``seconds``)."""
    job = queue.get_job(s, project, job_id)
    return JobMetricsOut(job_id=job.id, epochs=queue.epoch_series(s, job.id))


@router.get("/jobs/{job_id}/logs", name="jobs.logs")
def logs(
    job_id: str,
    _who: Reader,
    project: ProjectDep,
    s: SessionDep,
    after: int = Query(default=0, ge=0, le=MAX_OFFSET, description="Only lines with a larger id."),
) -> list[JobLogOut]:
    job = queue.get_job(s, project, job_id)
    return [
        JobLogOut.model_validate(r, from_attributes=True)
        for r in queue.job_logs(s, job.id, after=after)
    ]


@router.post("/jobs/{job_id}/cancel", name="jobs.cancel")
def cancel(
    job_id: str, _who: Trainer, project: ProjectDep, s: SessionDep, request: Request
) -> JobOut:
    request.state.audit_target = f"job:{job_id}"
    job = queue.request_cancel(s, queue.get_job(s, project, job_id))
    return job_out(s, job)
