"""The lifecycles kiln's records go through: what a job does, where it stands, and
where a deployment stands.

This module imports only the standard library, so the SDK (which has no SQLAlchemy),
the store, the services and the edges share one definition. The values are what the
database stores and the API returns: renaming one is a migration, not a refactor.
"""

from __future__ import annotations

import enum


class JobKind(enum.StrEnum):
    """What a job does; ``jobs/runner.py`` dispatches each to its body (``jobs/train_job.py``,
    ``jobs/compress_job.py``)."""

    train = "train"  # fit a spec on its data; registers a model version
    crossval = "crossval"  # k-fold cross-validation of a spec; metrics per fold, no version
    evaluate = "evaluate"  # score a registered version on a dataset; registers nothing
    compress = "compress"  # a compress spec's steps; registers each variant that fits


class JobState(enum.StrEnum):
    """A job's lifecycle."""

    queued = "queued"  # waiting for a worker (new, or re-queued after its worker died)
    running = "running"  # claimed by a worker that heartbeats while it works
    succeeded = "succeeded"  # finished; a train job has registered a model version
    failed = "failed"  # an error, or out of attempts after lost workers
    cancelled = "cancelled"  # stopped on request; never resumed


FINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.succeeded, JobState.failed, JobState.cancelled}
)
"""The job states nothing leaves: a job in one is over. Members compare equal to their
values, so ``"failed" in FINAL_STATES`` holds for a state read from JSON."""


class DeploymentState(enum.StrEnum):
    """A deployment's lifecycle (in the server that holds it)."""

    loading = "loading"  # versions being fetched, exported and warmed up
    ready = "ready"  # every route answers
    failed = "failed"  # a version could not be loaded; see ``error``
