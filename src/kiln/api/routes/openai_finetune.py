"""OpenAI's fine-tuning API under ``/v1`` (:mod:`kiln.serve.openai_finetune`).

- ``POST /v1/fine_tuning/jobs`` (scope ``train``, as submitting a train job): checks the
  base model (the catalog's), the training file and the optional validation file
  (files of the project) and the spec
  kiln builds, as ``POST /api/v1/jobs`` does, within the compute quota; queues a kiln
  train job and answers it as a ``fine_tuning.job`` (``ftjob-<job id>``).
- ``GET /v1/fine_tuning/jobs``, ``GET …/{id}``, ``GET …/{id}/events``,
  ``GET …/{id}/checkpoints`` (scope ``read``).
- ``POST …/{id}/cancel`` (scope ``train``): a queued job is cancelled at once, a running
  one stops within a heartbeat; a finished one is a 400 (code ``conflict``).

The project: as for ``/v1/files`` (:func:`kiln.api.routes.openai_files.openai_project`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy.orm import Session

from kiln.api.deps import Reader, ServicesDep, SessionDep, Trainer
from kiln.api.routes.jobs import checked_spec
from kiln.api.routes.openai_files import OpenAIProject
from kiln.api.schemas import JobIn
from kiln.errors import NotFoundError, SpecError
from kiln.jobs import queue
from kiln.lifecycle import JobKind
from kiln.manifest import JSONDocument
from kiln.monitor import usage
from kiln.serve import openai_finetune as ft
from kiln.serve.openai_files import file_id, get_file
from kiln.services import Services
from kiln.store.catalog import get_base_model
from kiln.store.tables import Job, Project

router = APIRouter(tags=["openai"])
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.post("/fine_tuning/jobs", name="openai.fine_tuning.create")
def create_job(
    body: ft.FineTuningJobCreate,
    who: Trainer,
    project: OpenAIProject,
    s: SessionDep,
    svc: ServicesDep,
    request: Request,
) -> ft.FineTuningJob:
    """Queue a LoRA fine-tune of ``model`` on ``training_file``."""
    ft.check_request(body)
    try:
        get_base_model(s, body.model)
    except NotFoundError:
        raise NotFoundError(
            f"model {body.model[:80]!r} is not a base model of the catalog "
            "(GET /api/v1/base-models lists them)",
            field="model",
        ) from None
    try:
        dataset = get_file(s, project, body.training_file)
    except NotFoundError as exc:
        raise NotFoundError(f"training_file: {exc.message}", field="training_file") from None
    validation_id = _validation_dataset(s, project, body.validation_file)
    hp = ft.resolve(body.chosen())
    seed = ft.new_seed(body.seed)
    row = _queued(s, svc, project, who.key_id, body, (dataset.id, validation_id), hp, seed)
    request.state.audit_target = f"job:{row.id}"
    queue.add_log(s, row.id, 0, "info", f"Created fine-tuning job: {ft.JOB_PREFIX}{row.id}")
    rec = ft.record_of(row)
    assert rec is not None
    return ft.job_out(s, svc.store, row, rec, project.name)


def _validation_dataset(s: Session, project: Project, validation_file: str | None) -> str | None:
    """The dataset id of the request's ``validation_file`` (a file of the project, as
    ``training_file``); a 404 naming ``validation_file`` for any other."""
    if validation_file is None:
        return None
    try:
        return get_file(s, project, validation_file).id
    except NotFoundError as exc:
        raise NotFoundError(f"validation_file: {exc.message}", field="validation_file") from None


def _queued(
    s: Session,
    svc: Services,
    project: Project,
    key_id: str | None,
    body: ft.FineTuningJobCreate,
    datasets: tuple[str, str | None],
    hp: ft.ResolvedHyperparameters,
    seed: int,
) -> Job:
    """The train job on ``datasets`` (training, validation or None), its spec checked
    as ``POST /api/v1/jobs`` checks one (a 400 naming the part of the request it came
    from), within the compute quota."""
    dataset_id, validation_id = datasets

    def spec_for(job_id: str) -> JSONDocument:
        name = ft.registered_name(body.model, body.suffix, job_id)
        return ft.fine_tune_spec(
            name=name,
            base=body.model,
            dataset_id=dataset_id,
            hp=hp,
            seed=seed,
            validation_id=validation_id,
        )

    # the name holds the job's id, not known yet: a stand-in of the same form is checked
    stand_in = spec_for("job_" + "0" * 16)
    try:
        checked_spec(s, svc.store, project, JobIn(kind=JobKind.train, spec=stand_in))
    except SpecError as exc:
        raise SpecError(f"the job kiln builds is invalid: {exc.message}", field=exc.field) from None
    usage.check_job_quotas(s, project.id)
    row = queue.new_job(
        s,
        project,
        JobKind.train,
        stand_in,
        max_attempts=svc.settings.max_attempts,
        created_by=key_id,
    )
    row.spec = spec_for(row.id)
    record = ft.FineTuneRecord(
        base=body.model,
        training_file=file_id(dataset_id),
        validation_file=None if validation_id is None else file_id(validation_id),
        hyperparameters=hp,
        seed=seed,
        suffix=body.suffix,
        fine_tuned_model=ft.fine_tuned_id(body.model, body.suffix, row.id),
        metadata=body.metadata,
    )
    row.options = {ft.OPTION: record.model_dump(mode="json")}
    s.flush()
    return row


@router.get("/fine_tuning/jobs", name="openai.fine_tuning.list")
def list_jobs(
    _who: Reader,
    project: OpenAIProject,
    s: SessionDep,
    svc: ServicesDep,
    after: str | None = None,
    limit: Limit = 20,
) -> ft.FineTuningJobList:
    """The project's fine-tuning jobs, newest first."""
    found, more = ft.list_jobs(s, project, after=after, limit=limit)
    return ft.FineTuningJobList(
        data=[ft.job_out(s, svc.store, job, rec, project.name) for job, rec in found], has_more=more
    )


@router.get("/fine_tuning/jobs/{fine_tuning_job_id}", name="openai.fine_tuning.get")
def get_job(
    fine_tuning_job_id: str, _who: Reader, project: OpenAIProject, s: SessionDep, svc: ServicesDep
) -> ft.FineTuningJob:
    job, rec = ft.get_fine_tune(s, project, fine_tuning_job_id)
    return ft.job_out(s, svc.store, job, rec, project.name)


@router.post("/fine_tuning/jobs/{fine_tuning_job_id}/cancel", name="openai.fine_tuning.cancel")
def cancel_job(
    fine_tuning_job_id: str,
    _who: Trainer,
    project: OpenAIProject,
    s: SessionDep,
    svc: ServicesDep,
    request: Request,
) -> ft.FineTuningJob:
    job, rec = ft.get_fine_tune(s, project, fine_tuning_job_id)
    request.state.audit_target = f"job:{job.id}"
    queue.request_cancel(s, job)
    return ft.job_out(s, svc.store, job, rec, project.name)


@router.get("/fine_tuning/jobs/{fine_tuning_job_id}/events", name="openai.fine_tuning.events")
def list_events(
    fine_tuning_job_id: str,
    _who: Reader,
    project: OpenAIProject,
    s: SessionDep,
    after: str | None = None,
    limit: Limit = 20,
) -> ft.JobEventList:
    """Log lines and per-epoch losses, newest first."""
    job, _ = ft.get_fine_tune(s, project, fine_tuning_job_id)
    page, more = ft.events(s, job, after=after, limit=limit)
    return ft.JobEventList(data=page, has_more=more)


@router.get(
    "/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", name="openai.fine_tuning.checkpoints"
)
def list_checkpoints(
    fine_tuning_job_id: str,
    _who: Reader,
    project: OpenAIProject,
    s: SessionDep,
    after: str | None = None,
    limit: Limit = 10,
) -> ft.JobCheckpointList:
    """A succeeded job's fine-tuned model as its one checkpoint; none before."""
    job, rec = ft.get_fine_tune(s, project, fine_tuning_job_id)
    listed = ft.checkpoints(s, job, rec)
    if after is not None:  # one checkpoint at most: nothing follows any cursor
        return ft.JobCheckpointList(data=[], has_more=False, first_id=None, last_id=None)
    return listed
