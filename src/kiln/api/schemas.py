"""Request and response bodies of the REST API (strict in, explicit out)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from typing_extensions import TypedDict

from kiln.jobs.queue import Progress
from kiln.jobs.resources import Resources
from kiln.lifecycle import JobKind
from kiln.manifest import JSONDocument
from kiln.store import registry
from kiln.store.keys import SCOPES
from kiln.store.projects import NAME
from kiln.store.tables import Job, Model, ModelVersion

T = TypeVar("T")

NAME_PATTERN = NAME.pattern
"""Projects, models, deployments, aliases: what ``check_name`` lets through."""
SEGMENT_PATTERN = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
"""Dataset names: what ``kiln.store.artifacts.safe_segment`` lets through."""


def _pattern(pattern: str) -> JSONDocument:
    # documented, not enforced by pydantic: the store's check answers with its own message
    return {"pattern": pattern}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
    next_offset: int | None = Field(
        description="Pass as ?offset= for the next page; null at the end."
    )


class PageFields(TypedDict, Generic[T]):
    """The keyword arguments of a :class:`Page` (``Page[X](**page_of(...))``)."""

    items: list[T]
    total: int
    limit: int
    offset: int
    next_offset: int | None


def page_of(items: list[T], total: int, limit: int, offset: int) -> PageFields[T]:
    nxt = offset + len(items)
    return {
        "items": items,
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": nxt if nxt < total else None,
    }


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    """The body of every 4xx and 5xx under /api/v1 and of the dashboard's JSON routes."""

    error: ErrorBody


ErrorResponse = ErrorOut


class V2ErrorOut(BaseModel):
    """The Open Inference Protocol's error body (the /v2 routes)."""

    error: str


class ProjectIn(Strict):
    name: str = Field(json_schema_extra=_pattern(NAME_PATTERN))


class ProjectOut(BaseModel):
    name: str
    created_at: datetime


class KeyIn(Strict):
    project: str | None = Field(
        default=None,
        description="The key's project; omitted by a global admin: a global key.",
        # "" is read as absent, like ?project=
        json_schema_extra={
            "anyOf": [{"type": "string", "pattern": f"{NAME_PATTERN}|^$"}, {"type": "null"}]
        },
    )
    scopes: list[str] = Field(
        json_schema_extra={"items": {"type": "string", "enum": list(SCOPES)}, "minItems": 1}
    )
    name: str = Field(default="", max_length=128)


class KeyOut(BaseModel):
    id: str
    name: str
    project: str | None
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


class NewKeyOut(KeyOut):
    key: str = Field(description="The full key. Shown this once; only its hash is stored.")


class ColumnOut(BaseModel):
    name: str
    kind: str
    dtype: str


class DatasetOut(BaseModel):
    id: str
    name: str
    format: str
    source: str
    fingerprint: str
    size_bytes: int
    rows: int
    columns: list[ColumnOut]
    created_at: datetime
    ref: str = Field(description="What a spec's data.source uses: dataset:<id>.")


class DatasetImport(Strict):
    name: str = Field(json_schema_extra=_pattern(SEGMENT_PATTERN))
    uri: str = Field(description="s3://bucket/key, or a path under KILN_DATA_ROOTS on the server.")


class JobIn(Strict):
    kind: JobKind
    spec: JSONDocument = Field(
        description="train/crossval: a kiln spec; evaluate: {model, version, data}; "
        "compress: a compress spec whose source is model:<name>[@<version>]."
    )
    folds: int | None = Field(default=None, ge=2, le=50, description="crossval only (default 5).")
    max_attempts: int | None = Field(default=None, ge=1, le=20)


class EvaluateSpec(Strict):
    model: str
    version: str | int = "latest"
    data: str = Field(description="dataset:<id>")


class ModelVersionRef(BaseModel):
    model: str
    version: int


# The job documents as the jobs layer writes them (kiln.jobs.queue.Progress,
# kiln.jobs.resources.Resources and Attempt). pydantic needs typing_extensions'
# TypedDict on Python 3.11, so the API spells them here; tests/test_client_shapes.py
# keeps the keys of all three in step.


class JobOut(BaseModel):
    id: str
    kind: str
    state: str
    attempts: int
    max_attempts: int
    progress: Progress
    # int stays int in the JSON; None: a metric that was undefined that epoch
    metrics: dict[str, int | float | None] = Field(description="The latest epoch's logs.")
    result: JSONDocument = Field(description="The job's outcome; its keys depend on the kind.")
    error: ErrorBody | None
    model_version: ModelVersionRef | None
    cancel_requested: bool
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: JSONDocument
    options: JSONDocument
    resources: Resources = Field(
        default_factory=Resources,
        description="wall_seconds, cpu_seconds (sums), peak_rss_bytes, gpu_peak_bytes (maxima), "
        "device, and attempts: [{attempt, state, ...}] of every attempt (see kiln.jobs.resources); "
        "executor (an attempt's too) when it trained on Ray: {kind, address, ray_job_id, "
        "worker_seconds, workers: [{rank, node_id, node_ip, pid, cpus, gpus}]} "
        "(see kiln.jobs.placement).",
    )


def job_out(s: Session, row: Job) -> JobOut:
    """The API's (and the dashboard's) view of a job row, with its version named."""
    version = None
    if row.model_version_id:
        mv = s.get(ModelVersion, row.model_version_id)
        model = s.get(Model, mv.model_id) if mv else None
        if mv is not None and model is not None:
            version = {"model": model.name, "version": mv.version}
    return JobOut(
        id=row.id,
        kind=row.kind,
        state=row.state,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        progress=row.progress or {},
        metrics=row.metrics or {},
        result=row.result or {},
        error=row.error,
        model_version=version,
        cancel_requested=row.cancel_requested,
        worker=row.worker_id,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        spec=row.spec,
        options=row.options or {},
        resources=row.resources or {},
    )


class JobMetricsOut(BaseModel):
    job_id: str
    # each epoch's logs and the attempt that ran it; int stays int in the JSON
    epochs: list[dict[str, int | float | None]]


class JobLogOut(BaseModel):
    id: int
    attempt: int
    level: str
    message: str
    time: datetime


class VersionOut(BaseModel):
    model: str
    version: int
    id: str
    task: str
    metrics: JSONDocument
    summary: JSONDocument
    job_id: str | None
    dataset_id: str | None
    parent_id: str | None
    size_bytes: int
    aliases: list[str]
    created_at: datetime


class ModelOut(BaseModel):
    name: str
    latest_version: int | None
    aliases: dict[str, int]
    created_at: datetime


def model_out(s: Session, model: Model) -> ModelOut:
    """A registered model: its latest version and its aliases."""
    return ModelOut(
        name=model.name,
        latest_version=registry.latest_version(s, model),
        aliases=registry.aliases_of(s, model),
        created_at=model.created_at,
    )


class AliasIn(Strict):
    version: int | str


class AuditOut(BaseModel):
    id: int
    time: datetime
    key_id: str | None
    project_id: int | None
    action: str
    target: str
    outcome: str
    status: int


class RouteIn(Strict):
    version: int | str
    weight: int = Field(ge=0, le=1000)


class DeploymentIn(Strict):
    name: str = Field(json_schema_extra=_pattern(NAME_PATTERN))
    model: str = Field(json_schema_extra=_pattern(NAME_PATTERN))
    version: int | str = Field(default="latest", description="A number, latest or an alias.")
    backend: Literal["auto", "torch", "onnx"] = Field(
        default="auto", description="auto: onnxruntime on CPU when it agrees with torch."
    )
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_delay_ms: float = Field(default=5.0, ge=0, le=1000)
    max_queue: int = Field(default=256, ge=1, le=100_000)
    timeout_ms: float = Field(default=10_000, gt=0, le=600_000)


class DeploymentPatch(Strict):
    version: int | str | None = Field(default=None, description="Hot swap to this version.")
    routes: list[RouteIn] | None = Field(
        default=None,
        description="Canary: versions with weights (the response says which answered).",
    )
    backend: Literal["auto", "torch", "onnx"] | None = None
    max_batch_size: int | None = Field(default=None, ge=1, le=4096)
    max_delay_ms: float | None = Field(default=None, ge=0, le=1000)
    max_queue: int | None = Field(default=None, ge=1, le=100_000)
    timeout_ms: float | None = Field(default=None, gt=0, le=600_000)


class RouteOut(BaseModel):
    version: int
    weight: int
    backend: str
    queue_depth: int


class DeploymentOut(BaseModel):
    name: str
    model: str
    task: str | None = Field(
        default=None,
        description="What the served model does: classification, regression (predict, "
        "KServe v2), generation (/v1/chat/completions, /v1/completions) or embedding "
        "(/v1/embeddings); null while no version is loaded.",
    )
    state: str
    error: str | None
    routes: list[RouteOut]
    backend: str
    max_batch_size: int
    max_delay_ms: float
    max_queue: int
    timeout_ms: float


class PredictIn(Strict):
    inputs: list[JSONDocument] = Field(description="Rows: {column: value}.")


class PredictOut(BaseModel):
    predictions: list[Any]
    probabilities: list[list[float]] | None = None
    labels: list[Any] | None = None
    model: str
    version: int
