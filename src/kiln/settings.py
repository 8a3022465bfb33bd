"""Settings: the only place kiln reads the environment (prefix ``KILN_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process-wide settings, read from ``KILN_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads torch may use (KILN_THREADS); default: torch's choice. "
        "Small models often train faster on 1 thread than on several.",
    )

    # --- the platform (kiln up / kiln worker) ---
    home: Path = Field(
        default=Path("~/.kiln"),
        description="KILN_HOME: the embedded database, artifacts and admin key live here.",
    )
    database_url: str | None = Field(
        default=None,
        description="KILN_DATABASE_URL, e.g. postgresql+psycopg://user@host/db; "
        "default: SQLite (WAL) at $KILN_HOME/kiln.db.",
    )
    artifacts: str | None = Field(
        default=None,
        description="KILN_ARTIFACTS: a directory or s3://bucket/prefix; "
        "default: $KILN_HOME/artifacts.",
    )
    ray_address: str | None = Field(
        default=None,
        description="KILN_RAY_ADDRESS: a Ray cluster (host:port or auto); "
        "workers then train specs with train.resources on it (Ray Train, DDP).",
    )
    ray_resource_timeout: float = Field(
        default=600.0,
        gt=0,
        description="KILN_RAY_RESOURCE_TIMEOUT: seconds a job waits for the Ray workers it "
        "asked for (an autoscaler may add nodes) before it fails.",
    )
    ray_max_failures: int = Field(
        default=3,
        ge=0,
        description="KILN_RAY_MAX_FAILURES: restarts of a job's Ray workers after a lost "
        "worker or node (each resumes from the last checkpoint).",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="KILN_S3_ENDPOINT_URL for S3-compatible servers (MinIO, ...)."
    )
    max_upload_mb: float = Field(
        default=200.0, gt=0, description="KILN_MAX_UPLOAD_MB: largest dataset upload accepted."
    )
    # what one dataset may hold, checked before it is stored (413 past a limit)
    max_dataset_rows: int = Field(
        default=10_000_000, ge=1, description="KILN_MAX_DATASET_ROWS: rows in one dataset."
    )
    max_dataset_cells: int = Field(
        default=200_000_000,
        ge=1,
        description="KILN_MAX_DATASET_CELLS: rows x columns in one dataset.",
    )
    max_decompressed_mb: float = Field(
        default=2048.0,
        gt=0,
        description="KILN_MAX_DECOMPRESSED_MB: a dataset's size once decompressed "
        "(.csv.gz, Parquet pages, archives).",
    )
    max_archive_files: int = Field(
        default=100_000,
        ge=1,
        description="KILN_MAX_ARCHIVE_FILES: files and folders in one .zip/.tar.gz dataset.",
    )
    heartbeat_seconds: float = Field(
        default=2.0, gt=0, description="KILN_HEARTBEAT_SECONDS: how often a worker reports in."
    )
    heartbeat_timeout: float = Field(
        default=30.0,
        gt=0,
        description="KILN_HEARTBEAT_TIMEOUT: a running job whose worker has been silent "
        "this long is re-queued (or failed once it used up its attempts).",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="KILN_MAX_ATTEMPTS: runs a job gets before it fails."
    )
    poll_seconds: float = Field(
        default=0.2, gt=0, description="KILN_POLL_SECONDS: an idle worker's queue poll interval."
    )
    data_roots: list[Path] = Field(
        default_factory=list,
        description="KILN_DATA_ROOTS (JSON list): server-side folders datasets may be "
        "registered from by path; none by default.",
    )
    allow_hub: bool = Field(
        default=False,
        description="KILN_ALLOW_HUB: let `kiln base-models add` (and local training) "
        "download a Hugging Face hub id; off by default, and no worker ever downloads.",
    )
    serve_api_key: str | None = Field(
        default=None,
        description="KILN_SERVE_API_KEY: the key `kiln serve` accepts (predict and read only); "
        "default: a new random key, printed once.",
    )

    # --- monitoring of deployments ---
    drift_window: int = Field(
        default=1000,
        ge=10,
        description="KILN_DRIFT_WINDOW: the most recent input rows a deployment compares "
        "with its training data for drift.",
    )
    drift_threshold: float = Field(
        default=0.2,
        gt=0,
        description="KILN_DRIFT_THRESHOLD: a column whose population stability index "
        "passes this is flagged as drifted (0.1-0.25 moderate, above 0.25 major).",
    )
    prediction_log_sample: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="KILN_PREDICTION_LOG_SAMPLE: the share of prediction requests whose "
        "inputs and outputs are kept in the artifact store; 0 turns the log off.",
    )
    prediction_log_max_mb: float = Field(
        default=50.0,
        ge=0,
        description="KILN_PREDICTION_LOG_MAX_MB: a deployment's prediction log stops "
        "growing at this size.",
    )
    monitor_flush_seconds: float = Field(
        default=2.0,
        gt=0,
        description="KILN_MONITOR_FLUSH_SECONDS: how often counted predictions (usage) "
        "and the prediction log are written.",
    )

    # --- rate limits, per API key ("limits" notation; per project: kiln quotas set) ---
    rate_limit_api: str = Field(
        default="100/second",
        description="KILN_RATE_LIMIT_API: requests one key may make to the management API "
        "(/api/v1 and /v2 but inference and health), e.g. 50/second or 20/second;600/minute; "
        "off turns it off.",
    )
    rate_limit_inference: str = Field(
        default="2000/second",
        description="KILN_RATE_LIMIT_INFERENCE: predict and v2 infer requests one key may "
        "make, e.g. 1000/second; off turns it off.",
    )

    @field_validator("rate_limit_api", "rate_limit_inference")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        """A bad limit stops the server at start, not at the first request."""
        from limits import parse_many  # only when the environment sets one

        value = value.strip()
        if value.lower() == "off":
            return "off"
        try:
            items = parse_many(value)
        except ValueError:
            items = []
        if not items or any(item.amount < 1 for item in items):
            raise ValueError(
                f"{value!r} is not a rate limit such as 50/second, 1000/minute or "
                "20/second;600/minute (at least 1 request), nor off"
            )
        return value

    # --- encryption at rest (kiln.store.crypto) ---
    master_key: SecretStr | None = Field(
        default=None,
        description="KILN_MASTER_KEY: base64 of 32 bytes that wraps the data keys; "
        "default: $KILN_HOME/master.key, created (mode 0600) at the first start.",
    )
    allow_plaintext_artifacts: bool = Field(
        default=False,
        description="KILN_ALLOW_PLAINTEXT_ARTIFACTS: read objects stored before encryption "
        "at rest as they are (else they are refused; see kiln keys encrypt-existing).",
    )
    s3_sse: Literal["AES256", "aws:kms"] | None = Field(
        default=None,
        description="KILN_S3_SSE: S3 server-side encryption of every object (AES256 or "
        "aws:kms), on top of kiln's own.",
    )
    s3_sse_kms_key_id: str | None = Field(
        default=None, description="KILN_S3_SSE_KMS_KEY_ID: the KMS key for KILN_S3_SSE=aws:kms."
    )

    # --- the client side (kiln datasets|jobs|models|keys|projects) ---
    url: str = Field(default="http://127.0.0.1:8080", description="KILN_URL: the server.")
    api_key: str | None = Field(default=None, description="KILN_API_KEY for the client.")
    project: str | None = Field(
        default=None, description="KILN_PROJECT: the project a global admin key acts on."
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home_dir / 'kiln.db'}"

    @property
    def resolved_artifacts(self) -> str:
        return self.artifacts or str(self.home_dir / "artifacts")

    @property
    def admin_key_file(self) -> Path:
        return self.home_dir / "admin.key"


def get_settings() -> Settings:
    """Read the settings now (cheap; callers pass the values inward)."""
    return Settings()


def apply_threads(settings: Settings) -> None:
    """Pin torch's intra-op thread count if the settings ask for it."""
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)
