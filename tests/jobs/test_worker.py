"""Real workers on the real queue: a train job end to end, resuming after a killed
worker, cancelling, draining on SIGTERM, and the same flow on PostgreSQL + S3."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from kiln.jobs.queue import epoch_series, job_logs, new_job, request_cancel
from kiln.jobs.worker import Worker
from kiln.lifecycle import FINAL_STATES, JobState
from kiln.settings import Settings
from kiln.store.artifacts import ArtifactStore
from kiln.store.crypto import open_artifacts
from kiln.store.datasets import Intake, ingest
from kiln.store.db import Database, migrate
from kiln.store.projects import ensure_project
from kiln.store.tables import Job, ModelVersion
from support import kiln_env, start_process, stop_process, wait_for

CHECKPOINT = "projects/default/jobs/{}/checkpoint.pt"


@dataclass
class Platform:
    """The store side of a kiln installation, without the HTTP server."""

    settings: Settings
    db: Database
    store: ArtifactStore
    dataset: str  # "dataset:<id>"

    def submit(self, epochs: int, **train: Any) -> str:
        spec = {
            "name": "wine",
            "task": "classification",
            "data": {"source": self.dataset, "target": "target"},
            "model": {"type": "mlp", "hidden": [32]},
            "train": {"epochs": epochs, "batch_size": 16, "device": "cpu", **train},
        }
        with self.db.session() as session:
            project = ensure_project(session, "default")
            return new_job(session, project, "train", spec, max_attempts=3).id

    def job(self, job_id: str) -> Job:
        with self.db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def logs(self, job_id: str) -> list[str]:
        with self.db.session() as session:
            return [row.message for row in job_logs(session, job_id)]

    def series(self, job_id: str) -> list[dict[str, Any]]:
        with self.db.session() as session:
            return epoch_series(session, job_id)

    def version(self, job: Job) -> ModelVersion:
        with self.db.session() as session:
            row = session.scalar(
                select(ModelVersion).where(ModelVersion.id == job.model_version_id)
            )
            assert row is not None
            return row

    def worker(self, **settings: Any) -> Worker:
        merged = self.settings.model_copy(update=settings)
        return Worker(merged, db=self.db, store=self.store)


def make_platform(tmp_path: Path, settings: Settings) -> Platform:
    from sklearn.datasets import load_wine

    migrate(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    store = open_artifacts(settings, db)  # as the worker processes open it: encrypted
    csv = tmp_path / "wine.csv"
    load_wine(as_frame=True).frame.to_csv(csv, index=False)
    with db.session() as session:
        project = ensure_project(session, "default")
        intake = Intake(session, store, project)
        row = ingest(intake, name="wine", filename="wine.csv", path=csv)
        dataset = f"dataset:{row.id}"
    return Platform(settings, db, store, dataset)


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    settings = Settings(home=tmp_path / "home", heartbeat_seconds=0.1, heartbeat_timeout=30)
    made = make_platform(tmp_path, settings)
    yield made
    made.db.dispose()


def work_until_finished(worker: Worker, platform: Platform, job_id: str, timeout: float) -> Job:
    """Run ``worker`` (recovering stale jobs as it goes) until the job has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.run_once():
            time.sleep(worker.settings.poll_seconds)
        if (job := platform.job(job_id)).state in FINAL_STATES:
            return job
    raise AssertionError(f"job {job_id} still {platform.job(job_id).state} after {timeout:g} s")


def check_registered(platform: Platform, job: Job, epochs: int) -> ModelVersion:
    assert job.state == JobState.succeeded, job.error
    version = platform.version(job)
    assert job.result["version"] == version.version
    assert version.job_id == job.id
    files = platform.store.list(version.artifact_key)
    assert {"kiln.json", "weights.safetensors", "preprocess.json"} <= {
        key.rsplit("/", 1)[-1] for key in files
    }
    assert not platform.store.exists(CHECKPOINT.format(job.id))
    assert [e["epoch"] for e in platform.series(job.id)] == list(range(1, epochs + 1))
    assert job.progress == {"epoch": epochs, "epochs": epochs}
    return version


def test_a_train_job_runs_end_to_end(platform: Platform) -> None:
    job_id = platform.submit(epochs=3)
    platform.worker().run(until_idle=True)
    job = platform.job(job_id)
    version = check_registered(platform, job, 3)
    assert (job.attempts, version.version) == (1, 1)
    assert job.worker_id is not None and job.finished_at is not None
    assert platform.logs(job_id)[-1] == "succeeded"


# --- worker processes ---------------------------------------------------------------


def start_worker(home: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    clean = kiln_env(home, KILN_HEARTBEAT_SECONDS="0.1", OMP_NUM_THREADS="1", **env)
    return start_process([sys.executable, "-m", "kiln.jobs.worker"], log, clean)


def stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, signal.SIGKILL, timeout=10)


def at_epoch(platform: Platform, job_id: str, epoch: int) -> Callable[[], bool]:
    def check() -> bool:
        job = platform.job(job_id)
        assert job.state not in FINAL_STATES, f"job ended early: {job.state} {job.error}"
        return int(job.progress.get("epoch", 0)) >= epoch

    return check


@pytest.mark.e2e
def test_a_job_resumes_from_its_checkpoint_after_its_worker_is_killed(
    platform: Platform, tmp_path: Path
) -> None:
    epochs = 12
    job_id = platform.submit(epochs=epochs, batch_size=4)
    proc = start_worker(platform.settings.home, tmp_path / "worker.log")
    try:
        wait_for(at_epoch(platform, job_id, 2), timeout=60, interval=0.02, what="epoch 2")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        stop(proc)
    killed = platform.job(job_id)
    assert (killed.state, killed.attempts) == (JobState.running, 1)
    assert platform.store.exists(CHECKPOINT.format(job_id))

    job = work_until_finished(platform.worker(heartbeat_timeout=0.5), platform, job_id, 60)
    check_registered(platform, job, epochs)
    assert job.attempts == 2
    logs = platform.logs(job_id)
    assert any("silent" in m and "re-queued" in m for m in logs), logs
    resumed = [m for m in logs if m.startswith("resumed from the checkpoint of epoch ")]
    assert len(resumed) == 1, logs
    start = int(resumed[0].rsplit(" ", 1)[-1])
    assert 2 <= start < epochs
    # every epoch once: those before the checkpoint from attempt 1, the rest from attempt 2
    attempts = [e["attempt"] for e in platform.series(job_id)]
    assert attempts == [1] * start + [2] * (epochs - start)


class Died(BaseException):
    """A worker dying on the spot (nothing of the runner's error handling runs)."""


def test_an_epoch_checkpointed_but_not_recorded_before_a_crash_stays_in_the_series(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.jobs.queue import Queue

    job_id = platform.submit(epochs=4)
    record = Queue.record_epoch

    def die_at_epoch_3(self: Queue, lease: Any, logs: dict[str, Any], total: int) -> None:
        if logs["epoch"] == 3:  # its checkpoint is written; the worker dies before reporting
            raise Died
        record(self, lease, logs, total)

    with monkeypatch.context() as patch:
        patch.setattr(Queue, "record_epoch", die_at_epoch_3)
        with pytest.raises(Died):
            platform.worker().run_once()
    assert [e["epoch"] for e in platform.series(job_id)] == [1, 2]

    job = work_until_finished(platform.worker(heartbeat_timeout=0.2), platform, job_id, 60)
    check_registered(platform, job, 4)
    assert "resumed from the checkpoint of epoch 3" in platform.logs(job_id)
    assert [e["attempt"] for e in platform.series(job_id)] == [1, 1, 2, 2]


def test_cancelling_a_running_job_stops_it_within_a_batch_or_so(platform: Platform) -> None:
    job_id = platform.submit(epochs=500, batch_size=4)  # minutes, were it not cancelled
    worker = platform.worker()
    thread = threading.Thread(target=worker.run_once, daemon=True)
    thread.start()
    try:
        wait_for(at_epoch(platform, job_id, 1), timeout=60, interval=0.02, what="epoch 1")
        with platform.db.session() as session:
            request_cancel(session, session.get(Job, job_id))  # type: ignore[arg-type]
        thread.join(10)  # the heartbeat sees the request within 0.1 s; the next batch stops
    finally:
        worker.draining.set()
        if worker.current is not None:
            worker.current.request_stop("shutdown")
        thread.join(10)
    assert not thread.is_alive()
    job = platform.job(job_id)
    assert (job.state, job.error, job.model_version_id) == (JobState.cancelled, None, None)
    assert job.progress["epoch"] < 50  # of 500
    assert platform.logs(job_id)[-1] == "cancelled"
    # a cancelled job never resumes, so its checkpoint is gone
    assert not platform.store.exists(CHECKPOINT.format(job_id))


@pytest.mark.e2e
def test_sigterm_drains_the_worker_after_its_job_finishes(
    platform: Platform, tmp_path: Path
) -> None:
    epochs = 6
    job_id = platform.submit(epochs=epochs, batch_size=4)
    log = tmp_path / "worker.log"
    proc = start_worker(platform.settings.home, log)
    try:
        wait_for(at_epoch(platform, job_id, 1), timeout=60, interval=0.02, what="epoch 1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        stop(proc)
    job = platform.job(job_id)
    check_registered(platform, job, epochs)
    assert job.attempts == 1
    assert "drained, exiting" in log.read_text()


@pytest.mark.e2e
def test_a_second_sigterm_puts_the_job_back_in_the_queue(
    platform: Platform, tmp_path: Path
) -> None:
    epochs = 15
    job_id = platform.submit(epochs=epochs, batch_size=4)
    log = tmp_path / "worker.log"
    proc = start_worker(platform.settings.home, log)
    try:
        wait_for(at_epoch(platform, job_id, 1), timeout=60, interval=0.02, what="epoch 1")
        proc.send_signal(signal.SIGTERM)
        # the first signal must be handled before the second is sent: the OS merges a
        # signal that arrives while the same one is still pending
        wait_for(lambda: "draining" in log.read_text(), timeout=10, interval=0.02, what="draining")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        stop(proc)
    job = platform.job(job_id)
    assert (job.state, job.attempts, job.worker_id) == (JobState.queued, 1, None), log.read_text()
    assert job.progress["epoch"] < epochs
    assert any(m.startswith("released") for m in platform.logs(job_id))
    assert platform.store.exists(CHECKPOINT.format(job_id))

    # any worker later resumes it from the checkpoint
    job = work_until_finished(platform.worker(), platform, job_id, 60)
    check_registered(platform, job, epochs)
    assert job.attempts == 2
    assert any(m.startswith("resumed from the checkpoint") for m in platform.logs(job_id))


# --- PostgreSQL + S3 ----------------------------------------------------------------


def test_a_train_job_on_postgres_and_s3(postgres_url: str, s3_bucket: Any, tmp_path: Path) -> None:
    import kiln
    from servers import s3_client

    settings = Settings(
        home=tmp_path / "home",
        database_url=postgres_url,
        artifacts=s3_bucket.url,
        s3_endpoint_url=s3_bucket.endpoint_url,
        heartbeat_seconds=0.1,
    )
    platform = make_platform(tmp_path, settings)
    try:
        job_id = platform.submit(epochs=3)
        platform.worker().run(until_idle=True)
        job = platform.job(job_id)
        version = check_registered(platform, job, 3)
        assert job.attempts == 1

        bucket, _, prefix = s3_bucket.url.removeprefix("s3://").partition("/")
        listed = s3_client(s3_bucket.endpoint_url).list_objects_v2(
            Bucket=bucket, Prefix=f"{prefix}/{version.artifact_key}/"
        )
        names = {obj["Key"].rsplit("/", 1)[-1] for obj in listed.get("Contents", [])}
        assert {"kiln.json", "weights.safetensors", "preprocess.json"} <= names

        platform.store.get_dir(version.artifact_key, tmp_path / "bundle")
        bundle = kiln.load(tmp_path / "bundle")
        assert bundle.meta.lineage.job == job_id
        row = {k: v for k, v in _wine_rows(1)[0].items() if k != "target"}
        assert len(bundle.predict([row]).predictions) == 1
    finally:
        platform.db.dispose()
    # nothing was kept locally but the master key: only the worker's scratch folder is
    # made, and it is empty again (jobs' temporary folders are removed, then its own)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "home").rglob("*")) == [
        Path("home/master.key"),
        Path("home/scratch"),
    ]


def _wine_rows(n: int) -> list[dict[str, Any]]:
    from sklearn.datasets import load_wine

    records: list[dict[str, Any]] = load_wine(as_frame=True).frame.head(n).to_dict("records")
    return records
