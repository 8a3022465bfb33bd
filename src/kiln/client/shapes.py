"""The JSON the server answers, as the SDK returns it.

Each shape is a ``TypedDict`` mirroring one of the API's response models
(:mod:`kiln.api.schemas` and the routes' own), so a type checker knows the keys while
callers still get, and index, the plain dicts the server sent. Times are ISO 8601
strings. Documents whose keys depend on the model or the job (a spec, a version's
metrics per split) are ``JsonValue``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, NotRequired, TypedDict, TypeVar

if TYPE_CHECKING:  # types only: importing the SDK does not load pydantic
    from pydantic import JsonValue

    Document = dict[str, JsonValue]
    """A JSON object whose keys depend on what it describes (a spec, a report)."""

T = TypeVar("T")


class Page(TypedDict, Generic[T]):
    """One page of a list route."""

    items: list[T]
    total: int
    limit: int
    offset: int
    next_offset: int | None  # None on the last page


class Health(TypedDict):
    status: str  # "ok"
    version: str  # the server's kiln version


class ErrorBody(TypedDict):
    """Why something failed: a kiln error code, its message and the field it names."""

    code: str
    message: str
    field: str | None


class ProjectOut(TypedDict):
    name: str
    created_at: str


class KeyOut(TypedDict):
    id: str
    name: str
    project: str | None  # None: a global admin key
    scopes: list[str]
    created_at: str
    revoked_at: str | None
    last_used_at: str | None


class NewKeyOut(KeyOut):
    key: str  # the secret, shown this once


class PinnedFile(TypedDict):
    path: str
    sha256: str
    size: int  # bytes


class BaseModelOut(TypedDict):
    """An entry of the base-model catalog (``base:<name>`` in specs)."""

    name: str
    ref: str
    kind: str  # hf_dir or gguf
    source: str | None  # shown to global admin keys only
    sha256: str
    size_bytes: int
    files: list[PinnedFile]
    created_at: str
    created_by: str | None


class ColumnOut(TypedDict):
    name: str
    kind: str
    dtype: str


class DatasetOut(TypedDict):
    id: str
    name: str
    format: str
    source: str
    fingerprint: str
    size_bytes: int
    rows: int
    columns: list[ColumnOut]
    created_at: str
    ref: str  # what a spec's data.source uses: dataset:<id>


class ModelVersionRef(TypedDict):
    model: str
    version: int


class JobProgress(TypedDict, total=False):
    """``epoch`` of ``epochs`` (training), ``fold`` of ``folds`` (cross-validation)."""

    epoch: int
    epochs: int
    fold: int
    folds: int


class WorkerPlacement(TypedDict):
    """One Ray Train worker of an attempt: its rank, where it ran and what it held."""

    rank: int
    node_id: str  # Ray's node id (hex)
    node_ip: str
    pid: int
    cpus: float
    gpus: float


class ExecutorRecord(TypedDict):
    """Where an attempt trained when it ran on a Ray cluster (``kiln.jobs.placement``)."""

    kind: str  # "ray"
    address: str  # the cluster the worker connected to (KILN_RAY_ADDRESS)
    ray_job_id: str
    worker_seconds: float  # Σ over workers of the seconds they trained
    workers: list[WorkerPlacement]


class AttemptResources(TypedDict):
    """What one attempt of a job used, and how it ended."""

    attempt: int
    state: str
    wall_seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    gpu_peak_bytes: NotRequired[int]  # only once the attempt used CUDA
    device: str
    executor: NotRequired[ExecutorRecord]  # only when it trained on Ray


class JobResources(TypedDict, total=False):
    """The attempts' totals (seconds summed, peaks the maximum), every attempt, and
    where the latest attempt trained when that was on Ray (``executor``)."""

    wall_seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    gpu_peak_bytes: int
    device: str
    attempts: list[AttemptResources]
    executor: ExecutorRecord


class VariantRef(TypedDict):
    """A variant a compress job registered."""

    variant: str
    version: int


class JobResult(TypedDict, total=False):
    """A job's outcome; which keys it has depends on the kind.

    train / evaluate: ``model``, ``version``, ``metrics`` (per split); crossval: ``k``,
    ``folds`` (each fold's metrics), ``mean``, ``std``; compress: ``model``,
    ``source_version``, ``variants``.
    """

    model: str
    version: int
    metrics: Document
    k: int
    folds: list[Document]
    mean: dict[str, float]
    std: dict[str, float]
    source_version: int
    variants: list[VariantRef]


class JobOut(TypedDict):
    id: str
    kind: str  # a kiln.lifecycle.JobKind value
    state: str  # a kiln.lifecycle.JobState value
    attempts: int
    max_attempts: int
    progress: JobProgress
    metrics: dict[str, float]  # the latest epoch's logs
    result: JobResult
    error: ErrorBody | None
    model_version: ModelVersionRef | None
    cancel_requested: bool
    worker: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    spec: Document
    options: Document
    resources: JobResources


class JobMetrics(TypedDict):
    """A job's per-epoch series: ``epoch``, ``train_loss``, ``val_*``, ``lr``, ``seconds``
    (and the ``attempt`` that ran the epoch)."""

    job_id: str
    epochs: list[dict[str, float]]


class JobLogOut(TypedDict):
    id: int
    attempt: int
    level: str
    message: str
    time: str


class VersionOut(TypedDict):
    model: str
    version: int
    id: str
    task: str
    metrics: Document  # per split ("val", "test"): what kiln.evaluate measured
    summary: Document  # architecture, parameters; a variant's runtime and report
    job_id: str | None
    dataset_id: str | None
    parent_id: str | None
    size_bytes: int
    aliases: list[str]
    created_at: str


class ModelOut(TypedDict):
    name: str
    latest_version: int | None
    aliases: dict[str, int]  # alias -> version
    created_at: str


class RouteOut(TypedDict):
    version: int
    weight: int
    backend: str
    queue_depth: int


class DeploymentOut(TypedDict):
    name: str
    model: str
    state: str
    error: str | None
    routes: list[RouteOut]
    backend: str
    max_batch_size: int
    max_delay_ms: float
    max_queue: int
    timeout_ms: float
    task: str | None  # classification | regression | generation | embedding; None while loading


class PredictOut(TypedDict):
    predictions: list[JsonValue]  # labels (classification) or values (regression)
    probabilities: list[list[float]] | None  # per row, in the order of ``labels``
    labels: list[JsonValue] | None
    model: str
    version: int  # the version (route) that answered


class QuotaOut(TypedDict):
    project: str
    kind: str
    period: str
    limit: float | None  # None once removed
    used: float  # in the quota's current period


class UsageItem(TypedDict):
    period: str  # 2026-01-31 (day), 2026-01 (month) or total
    kind: str
    device: str  # cpu or cuda for compute_seconds and worker_seconds; empty otherwise
    quantity: float
    deployment: str | None  # with by=deployment: what served predictions or tokens
    key: str | None  # with by=key: the API key id of token usage ("" if none is known)


UsageOut = TypedDict(
    "UsageOut",
    {
        "project": str,
        "from": str | None,  # a keyword in Python: hence the functional form
        "to": str | None,  # exclusive
        "group_by": str,
        "by": list[str],  # deployment and/or key
        "items": list[UsageItem],
        "totals": dict[str, float],  # per kind, over the whole range
        "quotas": list[QuotaOut],
    },
)
