"""An attempt that trained on Ray: its executor record is stored with the attempt and at
the top of ``Job.resources``, and its worker-seconds are metered once, when it ends."""

from __future__ import annotations

from sqlalchemy import select

from kiln.jobs.placement import ExecutorRecord, node_count
from kiln.jobs.queue import Queue, new_job
from kiln.jobs.resources import RUNNING, Figures, ResourceMeter, account
from kiln.store.db import Database
from kiln.store.projects import ensure_project
from kiln.store.tables import Job, UsageEvent

RECORD: ExecutorRecord = {
    "kind": "ray",
    "address": "127.0.0.1:6379",
    "ray_job_id": "02000000",
    "worker_seconds": 12.5,
    "workers": [
        {"rank": 0, "node_id": "n1", "node_ip": "10.0.0.1", "pid": 11, "cpus": 1.0, "gpus": 0.0},
        {"rank": 1, "node_id": "n2", "node_ip": "10.0.0.2", "pid": 12, "cpus": 1.0, "gpus": 0.0},
    ],
}


def test_the_meter_reports_where_the_attempt_trains() -> None:
    meter = ResourceMeter()
    assert "executor" not in meter.snapshot()
    meter.set_executor(RECORD)
    snapshot = meter.snapshot()
    assert snapshot["executor"] == RECORD
    assert list(snapshot)[-2:] == ["device", "executor"]
    assert node_count(RECORD) == 2


def test_worker_seconds_are_metered_once_when_the_attempt_ends(db: Database) -> None:
    queue = Queue(db, heartbeat_timeout=30)
    with db.session() as s:
        job_id = new_job(s, ensure_project(s, "default"), "train", {}, max_attempts=3).id
    claimed = queue.claim("w1")
    assert claimed is not None
    figures: Figures = {
        "wall_seconds": 5.0,
        "cpu_seconds": 1.0,
        "peak_rss_bytes": 10,
        "device": "cpu",
        "executor": RECORD,
    }
    for state in (RUNNING, RUNNING, "succeeded"):  # two heartbeats, then the end
        with db.session() as s:
            assert account(s, claimed[0], figures, state)
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.resources["executor"] == RECORD
        assert job.resources["attempts"][0]["executor"] == RECORD
        events = s.scalars(select(UsageEvent).where(UsageEvent.subject == job_id)).all()
    amounts = sorted((e.kind, e.quantity) for e in events)
    assert amounts == [("compute_seconds", 5.0), ("worker_seconds", 12.5)]


def test_a_worker_seconds_quota_refuses_new_jobs_counting_running_ones(db: Database) -> None:
    import pytest

    from kiln.errors import QuotaError
    from kiln.monitor.usage import check_job_quotas, set_quota

    queue = Queue(db, heartbeat_timeout=30)
    with db.session() as s:
        project = ensure_project(s, "default")
        new_job(s, project, "train", {}, max_attempts=3)
        project_id = project.id
        set_quota(s, project_id, "worker_seconds", "day", 10.0)
    claimed = queue.claim("w1")
    assert claimed is not None
    with db.session() as s:
        check_job_quotas(s, project_id)  # nothing used yet
    figures: Figures = {
        "wall_seconds": 5.0,
        "cpu_seconds": 1.0,
        "peak_rss_bytes": 10,
        "device": "cpu",
        "executor": RECORD,  # 12.5 worker-seconds, still running
    }
    with db.session() as s:
        assert account(s, claimed[0], figures, RUNNING)
    with db.session() as s, pytest.raises(QuotaError) as err:
        check_job_quotas(s, project_id)
    assert err.value.field == "worker_seconds"
    assert "still running" in err.value.message
