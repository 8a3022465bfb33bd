"""The durable job queue: rows in the metadata database, claimed atomically.

A claim is a conditional ``UPDATE … WHERE id = ? AND state = 'queued'``: of two
workers racing for one job exactly one sees a row changed, on SQLite (whose write
transactions are serialised) and on PostgreSQL (where the loser re-reads the row
after the winner commits and finds it no longer queued). Every later write of a
worker is conditional on its lease (job id, worker id and attempt number), so a
worker that was presumed dead and comes back cannot overwrite a newer attempt.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

# typing_extensions' TypedDict: pydantic (the API's JobOut) reads it on Python 3.11
from typing_extensions import TypedDict

from kiln.errors import ConflictError, NotFoundError
from kiln.lifecycle import FINAL_STATES, JobKind, JobState
from kiln.store.db import Database
from kiln.store.tables import Job, JobLog, JobMetric, Project, utcnow

EpochLogs = Mapping[str, float]
"""One epoch's figures as training reports them: ``epoch``, ``train_loss``, ``val_*``,
``lr``, ``seconds``."""
EpochRecord = dict[str, float]
"""One entry of a job's epoch series: its :data:`EpochLogs` and the ``attempt`` that ran it."""
ErrorRecord = Mapping[str, str | None]
"""Why a job failed, as stored: ``{code, message, field}`` (:meth:`KilnError.to_dict`)."""


class Progress(TypedDict, total=False):
    """Where a running job is: ``epoch`` of ``epochs`` (training), ``fold`` of ``folds``
    (cross-validation)."""

    epoch: int
    epochs: int
    fold: int
    folds: int


class LeaseLost(Exception):  # noqa: N818 - a condition, not a failure of ours
    """This worker no longer holds the job (re-queued after a missed heartbeat)."""


@dataclass(frozen=True)
class Lease:
    """What a worker holds while running one attempt of a job."""

    job_id: str
    worker_id: str
    attempt: int


def new_job(
    session: Session,
    project: Project,
    kind: JobKind | str,
    spec: dict[str, Any],
    *,
    max_attempts: int,
    created_by: str | None = None,
) -> Job:
    """Queue a job (the spec was validated by the caller). ``kind`` is a
    :class:`~kiln.lifecycle.JobKind` or its value; ``spec`` is the document as stored."""
    row = Job(
        id="job_" + secrets.token_hex(8),
        project_id=project.id,
        kind=JobKind(kind),
        spec=spec,
        state=JobState.queued,
        max_attempts=max_attempts,
        created_by=created_by,
        progress={},
        metrics={},
        result={},
    )
    session.add(row)
    session.flush()
    return row


def get_job(session: Session, project: Project, job_id: str) -> Job:
    row = session.get(Job, job_id)
    if row is None or row.project_id != project.id:
        raise NotFoundError(f"job {job_id} not found", field="job_id")
    return row


def list_jobs(
    session: Session, project: Project, *, state: str | None, limit: int, offset: int
) -> tuple[list[Job], int]:
    where = [Job.project_id == project.id]
    if state is not None:
        where.append(Job.state == state)
    total = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    rows = session.scalars(
        select(Job)
        .where(*where)
        .order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel a queued job now; ask a running one to stop (its worker sees it within a
    heartbeat). Cancelling a finished job is a conflict."""
    if job.state in FINAL_STATES:
        raise ConflictError(f"job {job.id} already {job.state}", field="state")
    if job.state == JobState.queued:
        job.state = JobState.cancelled
        job.finished_at = utcnow()
        add_log(session, job.id, job.attempts, "info", "cancelled before it started")
    else:
        job.cancel_requested = True
        add_log(session, job.id, job.attempts, "info", "cancel requested")
    return job


def add_log(session: Session, job_id: str, attempt: int, level: str, message: str) -> None:
    session.add(JobLog(job_id=job_id, attempt=attempt, level=level, message=message))


def epoch_series(session: Session, job_id: str) -> list[EpochRecord]:
    """The per-epoch metrics; where a resumed attempt re-ran an epoch, its values win."""
    rows = session.scalars(
        select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.attempt)
    )
    by_epoch: dict[int, EpochRecord] = {}
    for row in rows:
        by_epoch[row.epoch] = {**row.data, "epoch": row.epoch, "attempt": row.attempt}
    return [by_epoch[e] for e in sorted(by_epoch)]


def job_logs(session: Session, job_id: str, *, after: int = 0, limit: int = 1000) -> list[JobLog]:
    return list(
        session.scalars(
            select(JobLog)
            .where(JobLog.job_id == job_id, JobLog.id > after)
            .order_by(JobLog.id)
            .limit(limit)
        )
    )


class Queue:
    """The worker side of the queue: claim, heartbeat, record, finish, recover."""

    def __init__(self, db: Database, *, heartbeat_timeout: float) -> None:
        self.db = db
        self.heartbeat_timeout = heartbeat_timeout

    def claim(self, worker_id: str) -> tuple[Lease, Job] | None:
        """Take the oldest queued job, or None when the queue is empty."""
        now = utcnow()
        with self.db.session() as session:
            query = (
                select(Job.id)
                .where(Job.state == JobState.queued)
                .order_by(Job.created_at, Job.id)
                .limit(4)
            )
            if not self.db.is_sqlite:
                # other workers skip rows this one is looking at instead of queueing behind it
                query = query.with_for_update(skip_locked=True)
            for job_id in session.scalars(query).all():
                changed = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == JobState.queued)
                    .values(
                        state=JobState.running,
                        worker_id=worker_id,
                        attempts=Job.attempts + 1,
                        claimed_at=now,
                        heartbeat_at=now,
                        started_at=func.coalesce(Job.started_at, now),
                        cancel_requested=False,
                    )
                    .execution_options(synchronize_session=False)
                )
                if changed.rowcount == 1:  # type: ignore[attr-defined]
                    job = session.get(Job, job_id, populate_existing=True)
                    assert job is not None
                    add_log(
                        session,
                        job.id,
                        job.attempts,
                        "info",
                        f"attempt {job.attempts} started on {worker_id}",
                    )
                    return Lease(job.id, worker_id, job.attempts), job
        return None

    def _held(self, lease: Lease) -> Any:
        return (
            (Job.id == lease.job_id)
            & (Job.worker_id == lease.worker_id)
            & (Job.attempts == lease.attempt)
            & (Job.state == JobState.running)
        )

    def heartbeat(self, lease: Lease) -> bool:
        """Renew the lease; returns whether a cancel was requested. Raises LeaseLost."""
        with self.db.session() as session:
            changed = session.execute(
                update(Job).where(self._held(lease)).values(heartbeat_at=utcnow())
            )
            if changed.rowcount != 1:  # type: ignore[attr-defined]
                raise LeaseLost(lease.job_id)
            return bool(session.scalar(select(Job.cancel_requested).where(Job.id == lease.job_id)))

    def record_epoch(self, lease: Lease, logs: EpochLogs, total_epochs: int) -> None:
        """Record one epoch: the job's progress and latest metrics, and the series entry.
        Raises LeaseLost."""
        values = {k: v for k, v in logs.items() if k != "epoch"}
        progress: Progress = {"epoch": int(logs["epoch"]), "epochs": total_epochs}
        with self.db.session() as session:
            changed = session.execute(
                update(Job)
                .where(self._held(lease))
                .values(
                    heartbeat_at=utcnow(),
                    progress=progress,
                    metrics=values,
                )
            )
            if changed.rowcount != 1:  # type: ignore[attr-defined]
                raise LeaseLost(lease.job_id)
            session.add(
                JobMetric(
                    job_id=lease.job_id,
                    attempt=lease.attempt,
                    epoch=int(logs["epoch"]),
                    data=values,
                )
            )

    def set_progress(self, lease: Lease, progress: Progress) -> None:
        """Replace the job's progress (and renew its lease). Raises LeaseLost."""
        with self.db.session() as session:
            changed = session.execute(
                update(Job)
                .where(self._held(lease))
                .values(heartbeat_at=utcnow(), progress=progress)
            )
            if changed.rowcount != 1:  # type: ignore[attr-defined]
                raise LeaseLost(lease.job_id)

    def log(self, lease: Lease, level: str, message: str) -> None:
        with self.db.session() as session:
            add_log(session, lease.job_id, lease.attempt, level, message)

    def finish(
        self,
        session: Session,
        lease: Lease,
        state: JobState,
        *,
        result: dict[str, Any] | None = None,
        error: ErrorRecord | None = None,
        model_version_id: str | None = None,
    ) -> None:
        """Close the attempt inside the caller's transaction (so registering a version
        and succeeding commit together); ``result`` is the kind's JSON outcome, stored as
        given. Raises LeaseLost."""
        values: dict[str, object] = {"state": state, "finished_at": utcnow(), "error": error}
        if result is not None:
            values["result"] = result
        if model_version_id is not None:
            values["model_version_id"] = model_version_id
        changed = session.execute(update(Job).where(self._held(lease)).values(**values))
        if changed.rowcount != 1:  # type: ignore[attr-defined]
            raise LeaseLost(lease.job_id)
        message = f"{state.value}" + (f": {error['message']}" if error else "")
        add_log(session, lease.job_id, lease.attempt, "error" if error else "info", message)

    def release(self, lease: Lease, reason: str) -> None:
        """Put a job this worker cannot finish back in the queue (shutdown)."""
        with self.db.session() as session:
            session.execute(
                update(Job).where(self._held(lease)).values(state=JobState.queued, worker_id=None)
            )
            add_log(session, lease.job_id, lease.attempt, "warning", f"released: {reason}")

    def recover(self, now: datetime | None = None) -> tuple[list[str], list[str]]:
        """Re-queue running jobs whose worker went silent; fail those out of attempts.

        Returns (re-queued ids, failed-or-cancelled ids). Safe to run from every worker.
        """
        now = now or utcnow()
        cutoff = now - timedelta(seconds=self.heartbeat_timeout)
        requeued: list[str] = []
        ended: list[str] = []
        with self.db.session() as session:
            stale = session.scalars(
                select(Job).where(Job.state == JobState.running, Job.heartbeat_at < cutoff)
            ).all()
            for job in stale:
                silent = f"worker {job.worker_id} silent for over {self.heartbeat_timeout:g} s"
                if job.cancel_requested:
                    new_state, error = JobState.cancelled, None
                elif job.attempts < job.max_attempts:
                    new_state, error = JobState.queued, None
                else:
                    new_state = JobState.failed
                    error = {
                        "code": "worker_lost",
                        "message": f"{silent} on attempt {job.attempts} of {job.max_attempts}",
                        "field": None,
                    }
                changed = session.execute(
                    update(Job)
                    .where(
                        Job.id == job.id,
                        Job.state == JobState.running,
                        Job.attempts == job.attempts,
                        Job.heartbeat_at < cutoff,
                    )
                    .values(
                        state=new_state,
                        worker_id=None,
                        error=error,
                        finished_at=None if new_state == JobState.queued else now,
                    )
                )
                if changed.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                if new_state == JobState.queued:
                    requeued.append(job.id)
                    add_log(session, job.id, job.attempts, "warning", f"{silent}; re-queued")
                else:
                    ended.append(job.id)
                    add_log(session, job.id, job.attempts, "error", f"{silent}; {new_state.value}")
        return requeued, ended
