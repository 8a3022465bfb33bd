"""Where a job's attempt ran, when it ran on more than the worker process: the Ray
cluster, the Ray job, and each data-parallel training worker with its node and the
resources it held.

Recorded in the attempt's entry of ``Job.resources["attempts"]`` (key ``executor``) and,
for the latest attempt, at the top of ``Job.resources``; the dashboard's job page and
``kiln jobs show`` print it. ``worker_seconds`` (the workers' count times the seconds
they trained) is what the attempt is metered for as usage kind ``worker_seconds``.
"""

from __future__ import annotations

# typing_extensions' TypedDict: pydantic (the API's JobOut) reads it on Python 3.11
from typing_extensions import TypedDict


class WorkerPlacement(TypedDict):
    """One Ray Train worker: its rank, where it ran and what it held."""

    rank: int
    node_id: str  # Ray's node id (hex)
    node_ip: str
    pid: int
    cpus: float
    gpus: float


class ExecutorRecord(TypedDict):
    """An attempt's training on a Ray cluster."""

    kind: str  # "ray"
    address: str  # the cluster the worker connected to (KILN_RAY_ADDRESS)
    ray_job_id: str  # the Ray job (driver) the training ran under
    worker_seconds: float  # Σ over workers of the seconds they trained
    workers: list[WorkerPlacement]


def node_count(record: ExecutorRecord) -> int:
    """How many distinct Ray nodes the attempt's workers ran on."""
    return len({w["node_id"] for w in record["workers"]})
