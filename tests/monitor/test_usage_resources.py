"""Measuring a job's attempts and billing them: the meter, Job.resources, lost and
released attempts, and compute that is still running counting against a quota."""

from __future__ import annotations

import sys
import time
import types
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from kiln.errors import QuotaError
from kiln.jobs.context import JobContext
from kiln.jobs.queue import Queue, new_job
from kiln.jobs.resources import RUNNING, ResourceMeter, account, settle_lost
from kiln.jobs.runner import run
from kiln.lifecycle import JobState
from kiln.monitor import usage
from kiln.settings import Settings
from kiln.store.artifacts import open_store
from kiln.store.db import Database
from kiln.store.projects import ensure_project
from kiln.store.tables import Job, UsageEvent, utcnow


def _job(db: Database, spec: dict[str, Any] | None = None) -> str:
    with db.session() as s:
        project = ensure_project(s, "default")
        return new_job(s, project, "train", spec or {"name": "x"}, max_attempts=3).id


def _compute(db: Database) -> list[tuple[float, str, str]]:
    with db.session() as s:
        rows = s.execute(
            select(UsageEvent.quantity, UsageEvent.device, UsageEvent.subject)
            .where(UsageEvent.kind == "compute_seconds")
            .order_by(UsageEvent.id)
        )
        return [(q, d, subj) for q, d, subj in rows]


def _resources(db: Database, job_id: str) -> dict[str, Any]:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.resources


def test_the_meter_measures_wall_cpu_and_the_peak_memory_of_the_attempt() -> None:
    meter = ResourceMeter()
    block = bytearray(b"x" * (64 << 20))  # 64 MiB, every page touched
    del block
    spin = time.process_time() + 0.05
    while time.process_time() < spin:
        pass
    figures = meter.snapshot()
    assert figures["peak_rss_bytes"] >= 64 << 20
    assert figures["cpu_seconds"] >= 0.05
    assert figures["wall_seconds"] >= figures["cpu_seconds"] - 0.01
    assert figures["device"] == "cpu" and "gpu_peak_bytes" not in figures


class _FakeCuda:
    def __init__(self) -> None:
        self.resets = 0

    def is_initialized(self) -> bool:
        return True

    def reset_peak_memory_stats(self) -> None:
        self.resets += 1

    def max_memory_allocated(self) -> int:
        return 123_456


def test_the_meter_reads_the_gpu_peak_when_the_process_uses_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = _FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    meter = ResourceMeter()
    assert cuda.resets == 1  # the peak is the attempt's, not the process's
    figures = meter.snapshot()
    assert (figures["gpu_peak_bytes"], figures["device"]) == (123_456, "cuda")
    meter.device = "cuda:0"  # what a trained bundle reports
    assert meter.snapshot()["device"] == "cuda"


def test_attempts_accumulate_and_a_lost_attempt_is_billed_once_up_to_its_last_heartbeat(
    db: Database,
) -> None:
    queue = Queue(db, heartbeat_timeout=30)
    job_id = _job(db)
    claimed = queue.claim("w1")
    assert claimed is not None
    first = claimed[0]
    figures = {"wall_seconds": 5.0, "cpu_seconds": 4.0, "peak_rss_bytes": 100, "device": "cpu"}
    with db.session() as s:  # a heartbeat: shown on the job, not billed yet
        assert account(s, first, figures, RUNNING)
    assert _resources(db, job_id)["attempts"][0]["state"] == "running"
    assert _compute(db) == []
    with db.session() as s:
        assert usage.running_seconds(s, 1) == 5.0

    # the worker dies; another one re-queues the job and bills the silent attempt
    assert queue.recover(now=utcnow() + timedelta(seconds=60)) == ([job_id], [])
    for _ in range(2):  # settling twice bills once
        with db.session() as s:
            settle_lost(s, job_id)
    assert _compute(db) == [(5.0, "cpu", job_id)]
    with db.session() as s:  # a late heartbeat of the lost attempt changes nothing
        assert not account(s, first, {**figures, "wall_seconds": 9.0}, RUNNING)

    claimed = queue.claim("w2")
    assert claimed is not None
    second = claimed[0]
    with db.session() as s:
        assert account(
            s,
            second,
            {"wall_seconds": 3.0, "cpu_seconds": 2.5, "peak_rss_bytes": 300, "device": "cpu"},
            "succeeded",
        )
        queue.finish(s, second, JobState.succeeded)
    assert _compute(db) == [(5.0, "cpu", job_id), (3.0, "cpu", job_id)]
    res = _resources(db, job_id)
    assert [(a["attempt"], a["state"]) for a in res["attempts"]] == [(1, "lost"), (2, "succeeded")]
    assert (res["wall_seconds"], res["cpu_seconds"], res["peak_rss_bytes"]) == (8.0, 6.5, 300)
    assert res["device"] == "cpu"


def test_running_compute_counts_against_the_compute_quota_at_submission(db: Database) -> None:
    queue = Queue(db, heartbeat_timeout=30)
    _job(db)
    claimed = queue.claim("w1")
    assert claimed is not None
    with db.session() as s:
        account(s, claimed[0], {"wall_seconds": 50.0, "device": "cpu"}, RUNNING)
        usage.record(s, 1, "compute_seconds", 60.0, device="cpu", subject="job_old")
        usage.set_quota(s, 1, "compute_seconds", "month", 100)
    with db.session() as s, pytest.raises(QuotaError) as caught:
        usage.check_quota(s, 1, "compute_seconds", pending=usage.running_seconds(s, 1))
    assert caught.value.message == (
        "quota exceeded: compute_seconds per month is 100; 110 used (50 of them still running)"
    )
    assert caught.value.field == "compute_seconds"


def test_a_released_attempt_is_billed_and_the_job_goes_back_to_the_queue(
    db: Database, tmp_path: Path
) -> None:
    """A worker that shuts down mid-job bills the attempt it gives back."""
    spec = {
        "name": "iris",
        "task": "classification",
        "data": {"source": "sklearn:iris", "target": "target"},
        "model": {"type": "linear"},
        "train": {"epochs": 50, "batch_size": 8, "device": "cpu"},
    }
    job_id = _job(db, spec)
    queue = Queue(db, heartbeat_timeout=30)
    claimed = queue.claim("w1")
    assert claimed is not None
    lease, job = claimed
    store = open_store(Settings(home=tmp_path / "home").resolved_artifacts)
    ctx = JobContext(db=db, store=store, queue=queue, lease=lease)
    ctx.request_stop("shutdown")  # stops at the first batch
    assert run(ctx, job) is None
    with db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None and row.state == JobState.queued
    res = _resources(db, job_id)
    assert [a["state"] for a in res["attempts"]] == ["released"]
    billed = _compute(db)
    assert len(billed) == 1 and billed[0][0] > 0 and billed[0][1:] == ("cpu", job_id)
