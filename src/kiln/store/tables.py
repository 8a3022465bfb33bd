"""The metadata schema: projects, keys, datasets, jobs, models and the audit log.

Alembic migrations (``store/migrations``) create and evolve these tables; this
module is their one Python description. Times are stored as UTC and always come
back timezone-aware, on SQLite as on PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from kiln.lifecycle import JobState


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is stored in UTC and read back timezone-aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    # JSON columns name their type (mapped_column(JSON)): their annotations say what
    # the document holds, so they need no entry here
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime}


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key: its public id and the SHA-256 of its secret; the secret is never stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128), default="")
    # None: a global admin key (the one `kiln up` creates); else bound to one project
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id"), nullable=True)
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Dataset(Base):
    """An immutable table in the artifact store, with its fingerprint and inferred schema."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_project", "project_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(128))
    artifact_key: Mapped[str] = mapped_column(String(512))
    source: Mapped[str] = mapped_column(String(1024))  # "upload" or the registered URI
    format: Mapped[str] = mapped_column(String(16))
    fingerprint: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[list[Any]] = mapped_column(JSON)  # [{"name", "kind", "dtype"}]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_created", "state", "created_at"),
        Index("ix_jobs_project", "project_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    kind: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # e.g. crossval folds
    state: Mapped[str] = mapped_column(String(16), default=JobState.queued)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    progress: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)  # epoch/epochs, ...
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)  # latest epoch's
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[dict[str, str | None] | None] = mapped_column(JSON, nullable=True)
    model_version_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # wall/cpu seconds (sums), peak_rss_bytes, gpu_peak_bytes (maxima), device, attempts: [...]
    # (every attempt; see kiln.jobs.resources)
    resources: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class JobMetric(Base):
    """One epoch's logs of one attempt (the per-epoch series)."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "attempt", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, float]] = mapped_column(JSON)  # the epoch's logs
    time: Mapped[datetime] = mapped_column(default=utcnow)


class JobLog(Base):
    __tablename__ = "job_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    time: Mapped[datetime] = mapped_column(default=utcnow)


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    version: Mapped[int] = mapped_column(Integer)
    artifact_key: Mapped[str] = mapped_column(String(512))  # the bundle's prefix
    task: Mapped[str] = mapped_column(String(32))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)  # model type, parameters, ...
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    dataset_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    parent_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Alias(Base):
    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("model_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    name: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Deployment(Base):
    """A served model: routes (version, weight) and batching settings; restored on start."""

    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    routes: Mapped[list[Any]] = mapped_column(JSON)  # [{"version": 3, "weight": 90}, ...]
    backend: Mapped[str] = mapped_column(String(16))
    max_batch_size: Mapped[int] = mapped_column(Integer)
    max_delay_ms: Mapped[float] = mapped_column(Float)
    max_queue: Mapped[int] = mapped_column(Integer)
    timeout_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class UsageEvent(Base):
    """One metered quantity: compute seconds of a job, predictions served, bytes stored."""

    __tablename__ = "usage_events"
    __table_args__ = (Index("ix_usage_project_time", "project_id", "time"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    time: Mapped[datetime] = mapped_column(default=utcnow)
    # kiln.monitor.usage.KINDS: compute_seconds | worker_seconds | prediction_* | ..._tokens
    # | stored_bytes
    kind: Mapped[str] = mapped_column(String(32))
    quantity: Mapped[float] = mapped_column(Float)
    device: Mapped[str] = mapped_column(String(16), default="")  # cpu | cuda, for compute
    subject: Mapped[str] = mapped_column(String(128), default="")  # job id, deployment, dataset
    # the API key whose requests used the tokens; None: a session, or kiln serve's own key
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Quota(Base):
    """A per-project limit on a usage kind over a period; past it, 429."""

    __tablename__ = "quotas"
    __table_args__ = (UniqueConstraint("project_id", "kind", "period"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    kind: Mapped[str] = mapped_column(String(32))
    period: Mapped[str] = mapped_column(String(8))  # day | month | total
    limit: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_time", "time"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(default=utcnow)
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    project_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256), default="")
    outcome: Mapped[str] = mapped_column(String(64))  # "ok" or the error code
    status: Mapped[int] = mapped_column(Integer)


class CatalogModel(Base):
    """A base model in the catalog: files pinned in the artifact store, named by a global admin.

    Specs that run on the server name it as ``base:<name>``; no path is ever taken from
    a caller. ``files`` lists every pinned file with its SHA-256, checked on use.
    """

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # hf_dir | gguf
    source: Mapped[str] = mapped_column(String(1024))  # what the admin registered it from
    artifact_key: Mapped[str] = mapped_column(String(512))  # prefix of the pinned files
    sha256: Mapped[str] = mapped_column(String(64))  # over the sorted (path, sha256) list
    files: Mapped[list[Any]] = mapped_column(JSON)  # [{"path", "sha256", "size"}]
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)


class DataKey(Base):
    """A data-encryption key, stored only wrapped (AES-256-GCM) by the master key.

    One row per project; ``project_id`` None is the platform's own key (artifacts of no
    project), which also proves at start that the master key is the right one.
    ``master_key_id`` names the master key that wrapped it (a fingerprint, not the key).
    """

    __tablename__ = "data_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[int | None] = mapped_column(
        ForeignKey("projects.id"), nullable=True, unique=True
    )
    wrapped: Mapped[str] = mapped_column(Text)  # base64(nonce || ciphertext || tag)
    master_key_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(nullable=True)
