"""The layout of ``Job.resources`` as stored: the API, CLI and dashboard read this JSON,
so its keys and their order are part of the contract."""

from __future__ import annotations

import json

from kiln.jobs.queue import Queue, new_job
from kiln.jobs.resources import RUNNING, Figures, account
from kiln.store.db import Database
from kiln.store.projects import ensure_project
from kiln.store.tables import Job


def test_job_resources_keep_their_layout_totals_then_attempts(db: Database) -> None:
    queue = Queue(db, heartbeat_timeout=30)
    with db.session() as s:
        job_id = new_job(s, ensure_project(s, "default"), "train", {}, max_attempts=3).id
    claimed = queue.claim("w1")
    assert claimed is not None
    cpu: Figures = {"wall_seconds": 2.0, "cpu_seconds": 1.5, "peak_rss_bytes": 10, "device": "cpu"}
    gpu: Figures = {
        "wall_seconds": 1.25,
        "cpu_seconds": 1.0,
        "peak_rss_bytes": 30,
        "gpu_peak_bytes": 7,
        "device": "cuda",
    }
    with db.session() as s:
        assert account(s, claimed[0], cpu, RUNNING)
    with db.session() as s:
        assert account(s, claimed[0], gpu, "succeeded")
    with db.session() as s:  # as read back from the database
        job = s.get(Job, job_id)
        assert job is not None
        stored = json.dumps(job.resources)
    assert stored == (
        '{"wall_seconds": 1.25, "cpu_seconds": 1.0, "peak_rss_bytes": 30, '
        '"gpu_peak_bytes": 7, "device": "cuda", "attempts": [{"attempt": 1, '
        '"state": "succeeded", "wall_seconds": 1.25, "cpu_seconds": 1.0, '
        '"peak_rss_bytes": 30, "gpu_peak_bytes": 7, "device": "cuda"}]}'
    )


def test_a_cpu_attempt_has_no_gpu_figure(db: Database) -> None:
    queue = Queue(db, heartbeat_timeout=30)
    with db.session() as s:
        new_job(s, ensure_project(s, "default"), "train", {}, max_attempts=3)
    claimed = queue.claim("w1")
    assert claimed is not None
    cpu: Figures = {"wall_seconds": 2.0, "cpu_seconds": 1.5, "peak_rss_bytes": 10, "device": "cpu"}
    with db.session() as s:
        assert account(s, claimed[0], cpu, RUNNING)
    with db.session() as s:
        job = s.get(Job, claimed[0].job_id)
        assert job is not None
        assert list(job.resources) == [
            "wall_seconds",
            "cpu_seconds",
            "peak_rss_bytes",
            "device",
            "attempts",
        ]
        assert list(job.resources["attempts"][0]) == [
            "attempt",
            "state",
            "wall_seconds",
            "cpu_seconds",
            "peak_rss_bytes",
            "device",
        ]
