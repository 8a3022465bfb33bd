"""Running one claimed job to its end: the job kind's body, then its outcome in the database.

Each :class:`~kiln.lifecycle.JobKind` has one body: train, crossval and evaluate in
:mod:`kiln.jobs.train_job`, compress in :mod:`kiln.jobs.compress_job`; what they share
(the context, the datasets, closing the attempt) is :mod:`kiln.jobs.context`. Here the
outcome is recorded: a body's result, or why it stopped (cancelled, shutting down,
the lease lost) or failed. The transaction that closes the attempt also writes its
measured resources and meters its compute seconds (:mod:`kiln.jobs.resources`),
whatever the outcome.
"""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path

from kiln.errors import KilnError
from kiln.jobs.compress_job import run_compress
from kiln.jobs.context import JobContext, JobStopped, finish
from kiln.jobs.queue import LeaseLost
from kiln.jobs.resources import RELEASED, account
from kiln.jobs.train_job import run_crossval, run_evaluate, run_train
from kiln.lifecycle import JobKind, JobState
from kiln.store.tables import Job


def run(ctx: JobContext, job: Job) -> JobState | None:
    """Run ``job`` to its end and record the outcome; None when the lease was lost."""
    try:
        with tempfile.TemporaryDirectory(prefix=f"kiln-{job.id}-", dir=ctx.scratch) as tmp:
            return _run_kind(ctx, job, Path(tmp))
    except JobStopped:
        if ctx.reason == "cancelled":
            finish(ctx, JobState.cancelled)
            return JobState.cancelled
        if ctx.reason == "shutdown":
            # billed now: the attempt used the machine, though the job is not over
            with ctx.db.session() as session:
                account(session, ctx.lease, ctx.meter.snapshot(), RELEASED)
            ctx.queue.release(ctx.lease, "the worker is shutting down; it resumes later")
        return None
    except LeaseLost:
        # the worker that re-queued the job billed this attempt up to its last heartbeat
        return None
    except KilnError as exc:
        finish(ctx, JobState.failed, error=exc.to_dict())
        return JobState.failed
    except Exception as exc:  # a bug or an environment failure: keep the trace in the log
        ctx.queue.log(ctx.lease, "error", traceback.format_exc(limit=8))
        error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}", "field": None}
        finish(ctx, JobState.failed, error=error)
        return JobState.failed


def _run_kind(ctx: JobContext, job: Job, tmp: Path) -> JobState:
    """Run the body of the job's kind in ``tmp``; the state the job ended in. Train and
    compress jobs close their attempt as they register; the others are closed here."""
    try:
        kind = JobKind(job.kind)
    except ValueError:
        raise KilnError(f"unknown job kind {job.kind!r}", field="kind") from None
    match kind:
        case JobKind.train:
            run_train(ctx, job, tmp)
            return JobState.succeeded
        case JobKind.compress:
            return run_compress(ctx, job, tmp)
        case JobKind.crossval:
            result = run_crossval(ctx, job, tmp)
        case JobKind.evaluate:
            result = run_evaluate(ctx, job, tmp)
    finish(ctx, JobState.succeeded, result=result)
    return JobState.succeeded
