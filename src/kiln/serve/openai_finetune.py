"""OpenAI's fine-tuning API as kiln train jobs, and the fine-tuned models it makes.

A fine-tuning job is a kiln ``train`` job (same queue, workers, quotas, audit and
lineage) whose spec :func:`fine_tune_spec` builds: task generation, ``causal_lm`` from
the catalog's ``base:<model>``, LoRA ``r: 16`` merged into the saved weights, the
training file's dataset as ``data.source`` (chat format, every example trained on:
no held-out split), and the hyperparameters:

- ``n_epochs`` -> ``train.epochs`` (``auto``: :data:`AUTO_EPOCHS`);
- ``batch_size`` -> ``train.batch_size`` (``auto``: :data:`AUTO_BATCH_SIZE`);
- ``learning_rate_multiplier`` -> AdamW ``lr`` = :data:`BASE_LR` x the multiplier
  (``auto``: 1);
- ``seed`` -> ``train.seed`` and the split's seed (unset: a random one, reported).

``validation_file`` (a file of the project, checked as chat JSON lines when uploaded)
becomes ``data.validation: dataset:<id>``: the validation loss is measured on it after
every epoch (the events' "validation loss=…", the checkpoint's ``valid_loss``) and in
the bundle's ``val`` metrics. ``method`` may only be ``supervised``; ``integrations``
are refused.

The job's OpenAI facts (base model, files, resolved hyperparameters, seed, suffix, the
fine-tuned model's id) are kept in ``Job.options["openai"]`` (:class:`FineTuneRecord`);
its id is ``ftjob-<job id>``. Statuses: queued, running, succeeded, failed and
cancelled are kiln's job states (kiln checks the files when they are uploaded and the
spec when the job is created, so ``validating_files`` is never reported).

The fine-tuned model is registered under a path-safe kiln name,
``ft-<base>-<suffix>-<job hex>`` (:func:`registered_name`), and answers to
``ft:<base>:<suffix>:<job id>`` in ``/v1/chat/completions`` and ``/v1/completions``:
the first request naming it deploys the registered version under the kiln name (a
deployment with the default config, persisted and restored like any other, managed
through ``/api/v1/deployments``; the deployment is audited as ``deployments.create``
for the calling key), later ones use that deployment (:func:`served_name`).
``/v1/models`` lists the project's fine-tuned models by their ``ft:`` ids.

Events are the job's log lines and one ``metrics`` event per epoch ("Step N/M:
training loss=…", ``step`` counting epochs). Checkpoints: kiln keeps one resume
checkpoint per job while it runs (:mod:`kiln.jobs.checkpoints`), removed when the job
succeeds, and it is no servable model; so a succeeded job lists exactly one
checkpoint, its fine-tuned model after the last epoch, and any other job none.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from kiln.errors import ConflictError, DataError, KilnError, NotFoundError
from kiln.jobs.queue import epoch_series, job_logs
from kiln.lifecycle import JobKind, JobState
from kiln.manifest import JSONDocument, parse_manifest
from kiln.monitor.audit import record
from kiln.serve.deployments import DeploymentManager, NewDeployment
from kiln.serve.openai_files import unix
from kiln.serve.openai_schemas import Model
from kiln.store.artifacts import ArtifactStore
from kiln.store.db import Database
from kiln.store.tables import Job, JobLog, ModelVersion, Project
from kiln.store.tables import Model as RegisteredModel

JOB_PREFIX = "ftjob-"
FT_PREFIX = "ft:"
OPTION = "openai"  # the Job.options key of a fine-tuning job's record
AUTO_EPOCHS = 3
AUTO_BATCH_SIZE = 8
BASE_LR = 2e-4  # AdamW's lr at learning_rate_multiplier 1: a usual LoRA rate
LORA = {"r": 16}
SUFFIX_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$"
_UNSAFE = re.compile(r"[^a-z0-9_-]+")

Auto = Literal["auto"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Request):
    """OpenAI's hyperparameters; ``auto`` picks kiln's defaults (see the module)."""

    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0.0, le=10.0)] = "auto"


class Supervised(_Request):
    hyperparameters: Hyperparameters | None = None


class Method(_Request):
    """Only supervised fine-tuning (kiln's LoRA SFT)."""

    type: Literal["supervised"]
    supervised: Supervised | None = None


class FineTuningJobCreate(_Request):
    """``POST /v1/fine_tuning/jobs``'s body."""

    model: str = Field(min_length=1, description="A base model of the catalog, by name.")
    training_file: str = Field(min_length=1, description="file-<dataset id>")
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(default=None, pattern=SUFFIX_PATTERN)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[JSONDocument] | None = Field(
        default=None, max_length=0, description="Not supported: null or an empty list."
    )

    def chosen(self) -> Hyperparameters:
        """The hyperparameters, from ``method.supervised`` or the top-level field."""
        inner = self.method.supervised if self.method is not None else None
        if inner is not None and inner.hyperparameters is not None:
            return inner.hyperparameters
        return self.hyperparameters or Hyperparameters()


class ResolvedHyperparameters(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class FineTuneRecord(BaseModel):
    """What ``Job.options["openai"]`` keeps of a fine-tuning job."""

    base: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: ResolvedHyperparameters
    seed: int
    suffix: str | None = None
    fine_tuned_model: str
    metadata: dict[str, str] | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class SupervisedOut(BaseModel):
    hyperparameters: ResolvedHyperparameters


class MethodOut(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedOut


class FineTuningJob(BaseModel):
    """OpenAI's ``fine_tuning.job``."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    hyperparameters: ResolvedHyperparameters
    method: MethodOut
    training_file: str
    validation_file: str | None = None
    result_files: list[str] = []
    trained_tokens: int | None
    error: JobError | None
    seed: int
    estimated_finish: int | None = None
    integrations: list[JSONDocument] = []
    metadata: dict[str, str] | None = None
    user_provided_suffix: str | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class EventData(BaseModel):
    """A ``metrics`` event's figures: ``step`` is the epoch."""

    step: int
    total_steps: int | None
    train_loss: float | None
    valid_loss: float | None = None


class JobEvent(BaseModel):
    """OpenAI's ``fine_tuning.job.event``."""

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: EventData | None = None


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: float
    train_loss: float | None
    valid_loss: float | None = None


class JobCheckpoint(BaseModel):
    """OpenAI's ``fine_tuning.job.checkpoint``."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class JobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobCheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None


# ---- creating a job ------------------------------------------------------------------


def check_request(body: FineTuningJobCreate) -> None:
    """Refuse what kiln does not do (yet), naming the parameter."""
    if body.integrations:
        raise DataError("integrations are not supported", field="integrations")


def resolve(chosen: Hyperparameters) -> ResolvedHyperparameters:
    """``auto`` values replaced by kiln's defaults."""
    return ResolvedHyperparameters(
        n_epochs=AUTO_EPOCHS if chosen.n_epochs == "auto" else chosen.n_epochs,
        batch_size=AUTO_BATCH_SIZE if chosen.batch_size == "auto" else chosen.batch_size,
        learning_rate_multiplier=(
            1.0 if chosen.learning_rate_multiplier == "auto" else chosen.learning_rate_multiplier
        ),
    )


def new_seed(seed: int | None) -> int:
    """The seed asked for, else a random one (as OpenAI does; reported on the job)."""
    return seed if seed is not None else secrets.randbelow(2**31)


def registered_name(base: str, suffix: str | None, job_id: str) -> str:
    """The kiln model (and deployment) name of a job's fine-tuned model: at most 64
    characters of a-z, 0-9, '-' and '_' (``kiln.store.projects.check_name``)."""
    token = job_id.removeprefix("job_")
    parts = ["ft", _UNSAFE.sub("-", base.lower()).strip("-")[:24]]
    if suffix:
        parts.append(_UNSAFE.sub("-", suffix.lower()).strip("-")[: 63 - 25 - len(token) - 3])
    return "-".join([p for p in parts if p] + [token])


def fine_tuned_id(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's name of the fine-tuned model: ``ft:<base>:<suffix>:<job id>``."""
    return f"{FT_PREFIX}{base}:{suffix or ''}:{job_id}"


def fine_tune_spec(
    *,
    name: str,
    base: str,
    dataset_id: str,
    hp: ResolvedHyperparameters,
    seed: int,
    validation_id: str | None = None,
) -> JSONDocument:
    """The kiln train spec of a fine-tuning job (see the module for the mapping);
    ``validation_id``: the validation file's dataset."""
    data: JSONDocument = {
        "source": f"dataset:{dataset_id}",
        "format": "chat",
        "split": {"test": 0.0, "val": 0.0, "seed": seed},
    }
    if validation_id is not None:
        data["validation"] = f"dataset:{validation_id}"
    return {
        "name": name,
        "task": "generation",
        "data": data,
        "model": {"type": "causal_lm", "path": f"base:{base}", "lora": dict(LORA)},
        "train": {
            "epochs": hp.n_epochs,
            "batch_size": hp.batch_size,
            "optimizer": {"name": "adamw", "lr": BASE_LR * hp.learning_rate_multiplier},
            "seed": seed,
        },
    }


def record_of(job: Job) -> FineTuneRecord | None:
    """The job's fine-tuning record; None for a job not made by this API."""
    options = job.options or {}
    raw = options.get(OPTION)
    return FineTuneRecord.model_validate(raw) if isinstance(raw, dict) else None


def job_id_of(ftjob: str) -> str:
    """The kiln job id in ``ftjob-<job id>``; NotFoundError (field ``fine_tuning_job_id``)."""
    if not ftjob.startswith(JOB_PREFIX):
        raise NotFoundError(
            f"no fine-tuning job {ftjob[:80]!r} (ids look like ftjob-job_…)",
            field="fine_tuning_job_id",
        )
    return ftjob.removeprefix(JOB_PREFIX)


def get_fine_tune(session: Session, project: Project, ftjob: str) -> tuple[Job, FineTuneRecord]:
    """The project's fine-tuning job; NotFoundError for any other id (a plain kiln job too)."""
    job = session.get(Job, job_id_of(ftjob))
    found = record_of(job) if job is not None and job.project_id == project.id else None
    if job is None or found is None:
        raise NotFoundError(f"no fine-tuning job {ftjob[:80]!r}", field="fine_tuning_job_id")
    return job, found


# ---- reading jobs ----------------------------------------------------------------------

_STATUS: dict[str, Literal["queued", "running", "succeeded", "failed", "cancelled"]] = {
    JobState.queued: "queued",
    JobState.running: "running",
    JobState.succeeded: "succeeded",
    JobState.failed: "failed",
    JobState.cancelled: "cancelled",
}


def job_out(
    session: Session, store: ArtifactStore, job: Job, rec: FineTuneRecord, organization: str
) -> FineTuningJob:
    """The job in OpenAI's shape."""
    succeeded = job.state == JobState.succeeded
    error = None
    if job.state == JobState.failed:
        stored = job.error or {}
        error = JobError(
            code=stored.get("code") or "failed",
            message=stored.get("message") or "the job failed",
            param=stored.get("field"),
        )
    return FineTuningJob(
        id=JOB_PREFIX + job.id,
        created_at=unix(job.created_at) or 0,
        finished_at=unix(job.finished_at),
        model=rec.base,
        fine_tuned_model=rec.fine_tuned_model if succeeded else None,
        organization_id=organization,
        status=_STATUS[job.state],
        hyperparameters=rec.hyperparameters,
        method=MethodOut(supervised=SupervisedOut(hyperparameters=rec.hyperparameters)),
        training_file=rec.training_file,
        validation_file=rec.validation_file,
        trained_tokens=trained_tokens(session, store, job) if succeeded else None,
        error=error,
        seed=rec.seed,
        metadata=rec.metadata,
        user_provided_suffix=rec.suffix,
    )


def trained_tokens(session: Session, store: ArtifactStore, job: Job) -> int | None:
    """Tokens trained on: the training split's real (non-padding) tokens x the epochs
    run, from the registered bundle's manifest; None where it cannot be read."""
    from kiln.bundle import META_FILE  # only here: kiln.bundle imports torch

    version = session.get(ModelVersion, job.model_version_id) if job.model_version_id else None
    if version is None:
        return None
    key = f"{version.artifact_key}/{META_FILE}"
    try:
        meta = parse_manifest(json.loads(store.get_bytes(key)), key)
    except (KilnError, OSError, ValueError):
        return None
    tokens = meta.training.tokens
    return None if tokens is None else tokens.tokens * meta.training.epochs_run


def list_jobs(
    session: Session, project: Project, *, after: str | None, limit: int
) -> tuple[list[tuple[Job, FineTuneRecord]], bool]:
    """The project's fine-tuning jobs, newest first, ``limit`` after the job ``after``;
    and whether more follow."""
    fine_tuned = Job.options[OPTION]["fine_tuned_model"].as_string()
    where = [Job.project_id == project.id, Job.kind == JobKind.train, fine_tuned.is_not(None)]
    if after is not None:
        mark, _ = get_fine_tune(session, project, after)
        where.append(
            or_(
                Job.created_at < mark.created_at,
                and_(Job.created_at == mark.created_at, Job.id > mark.id),
            )
        )
    rows = list(
        session.scalars(
            select(Job).where(*where).order_by(Job.created_at.desc(), Job.id).limit(limit + 1)
        )
    )
    found = [(job, rec) for job in rows[:limit] if (rec := record_of(job)) is not None]
    return found, len(rows) > limit


# ---- events and checkpoints --------------------------------------------------------------

_LEVELS: dict[str, Literal["info", "warn", "error"]] = {
    "info": "info",
    "warning": "warn",
    "error": "error",
}


def events(
    session: Session, job: Job, *, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    """The job's events, newest first: its log lines and one metrics event per epoch;
    ``limit`` of them after the event ``after``, and whether more follow."""
    total = (job.progress or {}).get("epochs")
    timed: list[tuple[datetime, int, JobEvent]] = []
    for log in job_logs(session, job.id, limit=10_000):
        timed.append((log.time, log.id, _log_event(log)))
    times = _epoch_times(session, job.id)
    for entry in epoch_series(session, job.id):
        epoch = int(entry["epoch"])
        at = times.get((epoch, int(entry["attempt"])))
        if at is None:
            continue
        timed.append((at[0], at[1], _epoch_event(at[1], at[0], epoch, total, entry)))
    timed.sort(key=lambda t: (t[0], t[2].type == "message", t[1]), reverse=True)
    ordered = [event for _, _, event in timed]
    start = 0
    if after is not None:
        ids = [e.id for e in ordered]
        start = ids.index(after) + 1 if after in ids else len(ids)
    page = ordered[start : start + limit]
    return page, start + limit < len(ordered)


def _epoch_times(session: Session, job_id: str) -> dict[tuple[int, int], tuple[datetime, int]]:
    """(epoch, attempt) -> (time, row id) of the job's epoch records."""
    from kiln.store.tables import JobMetric

    rows = session.execute(
        select(JobMetric.epoch, JobMetric.attempt, JobMetric.time, JobMetric.id).where(
            JobMetric.job_id == job_id
        )
    ).all()
    return {(epoch, attempt): (time, row_id) for epoch, attempt, time, row_id in rows}


def _log_event(log: JobLog) -> JobEvent:
    return JobEvent(
        id=f"ftevent-log-{log.id}",
        created_at=unix(log.time) or 0,
        level=_LEVELS.get(log.level, "info"),
        message=log.message,
        type="message",
    )


def _epoch_event(
    row_id: int, at: datetime, epoch: int, total: int | None, entry: dict[str, float]
) -> JobEvent:
    train, valid = entry.get("train_loss"), entry.get("val_loss")
    message = f"Step {epoch}" + (f"/{total}" if total else "")
    if train is not None:
        message += f": training loss={train:.4f}"
    if valid is not None:
        message += f", validation loss={valid:.4f}"
    return JobEvent(
        id=f"ftevent-epoch-{row_id}",
        created_at=unix(at) or 0,
        level="info",
        message=message,
        type="metrics",
        data=EventData(step=epoch, total_steps=total, train_loss=train, valid_loss=valid),
    )


def checkpoints(session: Session, job: Job, rec: FineTuneRecord) -> JobCheckpointList:
    """A succeeded job's one checkpoint, its fine-tuned model after the last epoch;
    none for any other job (see the module)."""
    series = epoch_series(session, job.id)
    if job.state != JobState.succeeded or not series:
        return JobCheckpointList(data=[], has_more=False, first_id=None, last_id=None)
    last = series[-1]
    step = int(last["epoch"])
    checkpoint = JobCheckpoint(
        id=f"ftckpt-{job.id}-{step}",
        created_at=unix(job.finished_at) or 0,
        fine_tuned_model_checkpoint=rec.fine_tuned_model,
        fine_tuning_job_id=JOB_PREFIX + job.id,
        metrics=CheckpointMetrics(
            step=step, train_loss=last.get("train_loss"), valid_loss=last.get("val_loss")
        ),
        step_number=step,
    )
    return JobCheckpointList(
        data=[checkpoint], has_more=False, first_id=checkpoint.id, last_id=checkpoint.id
    )


# ---- serving fine-tuned models -------------------------------------------------------------


def _parse_fine_tuned(model: str) -> str:
    """The job id at the end of ``ft:<base>:<suffix>:<job id>``."""
    parts = model.split(":")
    if len(parts) != 4 or not parts[3]:
        raise _no_fine_tuned(model)
    return parts[3]


def _no_fine_tuned(model: str) -> NotFoundError:
    return NotFoundError(
        f"the model {model[:120]!r} does not exist: no succeeded fine-tuning job of this "
        "project made it",
        field="model",
    )


def _fine_tuned_version(session: Session, project_id: int, model: str) -> tuple[Project, str, int]:
    """(project, registered name, version number) of the fine-tuned model ``model``."""
    job = session.get(Job, _parse_fine_tuned(model))
    rec = record_of(job) if job is not None and job.project_id == project_id else None
    if job is None or rec is None or rec.fine_tuned_model != model:
        raise _no_fine_tuned(model)
    version = session.get(ModelVersion, job.model_version_id) if job.model_version_id else None
    registered = session.get(RegisteredModel, version.model_id) if version is not None else None
    project = session.get(Project, project_id)
    if job.state != JobState.succeeded or registered is None or project is None:
        raise _no_fine_tuned(model)
    assert version is not None
    return project, registered.name, version.version


def resolve_fine_tuned(db: Database, project_id: int, model: str) -> tuple[Project, str, int]:
    """:func:`_fine_tuned_version` in a transaction of its own (blocking)."""
    with db.session() as s:
        return _fine_tuned_version(s, project_id, model)


async def served_name(
    manager: DeploymentManager, project_id: int, model: str, *, key_id: str | None
) -> str:
    """The deployment a ``/v1`` request's ``model`` names: ``model`` itself, unless it is
    a fine-tuned model's ``ft:`` id (deployment names hold no colon). That one answers
    from the deployment of its registered version under the kiln name, created now if
    there is none (deploy on first use; audited for ``key_id``). A NotFoundError
    (field ``model``) for an ``ft:`` id no succeeded fine-tuning job of the project made.
    """
    if not model.startswith(FT_PREFIX):
        return model
    project, name, version = await asyncio.to_thread(
        resolve_fine_tuned, manager.db, project_id, model
    )
    if (project_id, name) in manager.live:
        return name
    try:
        await manager.create(project, NewDeployment(name=name, model=name, version=version))
    except ConflictError:
        if (project_id, name) not in manager.live:  # not a concurrent first use: a real one
            raise
        return name
    await asyncio.to_thread(_audit_deploy, manager.db, project_id, name, key_id)
    return name


def _audit_deploy(db: Database, project_id: int, name: str, key_id: str | None) -> None:
    with db.session() as s:
        record(
            s,
            action="deployments.create",
            target=f"deployment:{name}",
            outcome="ok",
            status=201,
            key_id=key_id,
            project_id=project_id,
        )


def fine_tuned_models(db: Database, project_id: int) -> list[Model]:
    """The project's fine-tuned models, by their ``ft:`` ids (blocking)."""
    with db.session() as s:
        project = s.get(Project, project_id)
        if project is None:
            return []
        jobs, _ = list_jobs(s, project, after=None, limit=10_000)
        return [
            Model(
                id=rec.fine_tuned_model, created=unix(job.finished_at) or 0, owned_by=project.name
            )
            for job, rec in jobs
            if job.state == JobState.succeeded
        ]


def fine_tuned_model(db: Database, project_id: int, model: str) -> Model:
    """The project's fine-tuned model ``model`` (an ``ft:`` id) as ``/v1/models`` lists
    it (blocking); a NotFoundError (field ``model``) for any other, another project's too."""
    with db.session() as s:
        project, _, _ = _fine_tuned_version(s, project_id, model)
        job = s.get(Job, _parse_fine_tuned(model))
        assert job is not None  # _fine_tuned_version found it
        return Model(id=model, created=unix(job.finished_at) or 0, owned_by=project.name)
