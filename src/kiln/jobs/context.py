"""What every job kind shares while it runs: the :class:`JobContext` it may touch, the
request to stop, its datasets copied out of the artifact store, and the end of the
attempt in the database (its state, result, measured resources and metered compute
committed together, :mod:`kiln.jobs.resources`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from kiln.errors import NotFoundError
from kiln.jobs.queue import ErrorRecord, Lease, LeaseLost, Queue
from kiln.jobs.resources import ResourceMeter, account
from kiln.jobs.results import JobResult
from kiln.lifecycle import JobState
from kiln.store.artifacts import ArtifactStore, safe_key
from kiln.store.datasets import archive_root, dataset_ref
from kiln.store.db import Database
from kiln.store.tables import Dataset, Job, Project
from kiln.train.executor import Executor


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
    executor: Executor | None = None  # where train.resources specs train (a Ray cluster)

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.reason = reason
            self.stop.set()

    def raise_if_stopped(self) -> None:
        """Raise :class:`JobStopped` once a stop was requested."""
        if self.stop.is_set():
            raise JobStopped(self.reason)


def checkpoint_key(project: str, job_id: str) -> str:
    """Where a train job's latest checkpoint lives in the artifact store."""
    return safe_key("projects", project, "jobs", job_id, "checkpoint.pt")


def close_attempt(
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


def finish(
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
            close_attempt(ctx, session, state, result=result, error=error)
            job = session.get(Job, ctx.lease.job_id)
            project = session.get(Project, job.project_id) if job is not None else None
        if state != JobState.succeeded and project is not None:
            # a failed or cancelled job never resumes: its checkpoint would only take space
            ctx.store.delete(checkpoint_key(project.name, ctx.lease.job_id))
    except LeaseLost:
        pass  # a newer attempt owns the job now


def job_project(ctx: JobContext, job: Job) -> Project:
    """The project that owns ``job``."""
    with ctx.db.session() as session:
        project = session.get(Project, job.project_id)
    assert project is not None
    return project


def fetch_dataset(ctx: JobContext, job: Job, source: str, tmp: Path) -> tuple[str, Dataset | None]:
    """A local path for a spec's data source: ``dataset:<id>`` is copied out of the store
    into ``data_dir(tmp)``; an archive's files into a folder of their own there."""
    dataset_id = dataset_ref(source)
    if dataset_id is None:
        return source, None
    with ctx.db.session() as session:
        dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.project_id != job.project_id:
        raise NotFoundError(f"dataset {dataset_id} not found", field="spec.data.source")
    root = archive_root(dataset)
    if root is not None:  # an image folder, or a table at the top beside its images
        folder = data_dir(tmp) / dataset.id
        ctx.store.get_dir(root, folder)
        return str(folder.joinpath(*dataset.artifact_key[len(root) :].split("/"))), dataset
    local = data_dir(tmp) / dataset.artifact_key.rsplit("/", 1)[-1]
    local.parent.mkdir(parents=True, exist_ok=True)
    ctx.store.get_file(dataset.artifact_key, local)
    return str(local), dataset


def data_dir(tmp: Path) -> Path:
    """Where a job's datasets are copied; the only folder its image paths may name."""
    return tmp / "data"


def folder_size(folder: Path) -> int:
    """The bytes of a saved bundle's files."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
