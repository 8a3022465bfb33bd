"""The job queue's overhead: many tiny jobs through real worker processes.

(Not named queue.py: run as a script, that would shadow the standard library's
``queue`` module, which psycopg imports.)

    .venv/bin/python benchmarks/job_queue.py [--jobs 200] [--workers 1 2]
        [--database-url postgresql+psycopg://...] [--timeout 300]

For each worker count: a fresh KILN_HOME (SQLite and local artifacts; with
``--database-url`` that database instead, which should hold no queued jobs), the
workers started (``python -m kiln.jobs.worker``) and idle, then ``--jobs`` train jobs
queued at once (a linear model on sklearn:iris, one epoch: the work itself is ~10 ms,
so what is measured is the platform around it). Figures come from the job rows:

- claim latency: claimed_at - max(created_at, the same worker's previous finished_at),
  the wait a free worker sees before it holds the next job (p50/p95);
- claim -> epoch 1: from the claim to the first epoch's metrics (dataset, spec, model
  build; a worker's first job also imports torch, so the max is shown apart);
- run: claimed_at -> finished_at (train, store the bundle, register the version);
- throughput: jobs / (last finished - first created); "steady" counts from the moment
  every worker has finished its first job (which pays for importing torch).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from kiln.jobs.queue import new_job
from kiln.store.db import Database, migrate
from kiln.store.projects import ensure_project
from kiln.store.tables import FINISHED, Job, JobMetric, JobState

SPEC: dict[str, Any] = {
    "name": "iris",
    "task": "classification",
    "data": {"source": "sklearn:iris", "target": "target"},
    "model": {"type": "linear"},
    "train": {"epochs": 1, "batch_size": 32, "device": "cpu"},
}


def start_workers(count: int, home: Path, database_url: str) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(KILN_HOME=str(home), KILN_DATABASE_URL=database_url, OMP_NUM_THREADS="1")
    procs = []
    for i in range(count):
        with (home / f"worker-{i}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "kiln.jobs.worker"], env=env, stdout=log, stderr=log
                )
            )
    return procs


def wait_idle(home: Path, count: int, timeout: float) -> None:
    """Until every worker has logged that it waits for jobs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = [(home / f"worker-{i}.log").read_text() for i in range(count)]
        if all("waiting for jobs" in text for text in logs):
            return
        time.sleep(0.1)
    raise SystemExit("workers did not start in time:\n" + "\n".join(logs))


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def submit(db: Database, project_name: str, jobs: int) -> list[str]:
    with db.session() as session:
        queued = session.scalar(
            select(func.count()).select_from(Job).where(Job.state == JobState.queued)
        )
        if queued:
            raise SystemExit(f"the database already holds {queued} queued jobs")
        project = ensure_project(session, project_name)
        return [new_job(session, project, "train", SPEC, max_attempts=1).id for _ in range(jobs)]


def wait_done(db: Database, ids: list[str], deadline: float) -> bool:
    while time.monotonic() < deadline:
        with db.session() as session:
            left = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.id.in_(ids), Job.state.not_in(list(FINISHED)))
            )
        if not left:
            return True
        time.sleep(0.25)
    return False


def ms(seconds: float) -> float:
    return seconds * 1000.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(db: Database, ids: list[str]) -> dict[str, Any]:
    with db.session() as session:
        jobs = list(session.scalars(select(Job).where(Job.id.in_(ids))))
        first_epoch: dict[str, datetime] = {
            job_id: time
            for job_id, time in session.execute(
                select(JobMetric.job_id, func.min(JobMetric.time))
                .where(JobMetric.job_id.in_(ids), JobMetric.epoch == 1)
                .group_by(JobMetric.job_id)
            )
        }
    done = [j for j in jobs if j.claimed_at is not None and j.finished_at is not None]
    by_worker: dict[str, list[Job]] = {}
    for job in done:
        by_worker.setdefault(job.worker_id or "?", []).append(job)
    claim, to_epoch, first_to_epoch = [], [], []
    for runs in by_worker.values():
        runs.sort(key=lambda j: j.claimed_at)  # type: ignore[arg-type, return-value]
        previous: datetime | None = None
        for i, job in enumerate(runs):
            assert job.claimed_at is not None
            ready = job.created_at if previous is None else max(job.created_at, previous)
            claim.append((job.claimed_at - ready).total_seconds())
            if job.id in first_epoch:
                took = (first_epoch[job.id] - job.claimed_at).total_seconds()
                (first_to_epoch if i == 0 else to_epoch).append(took)
            previous = job.finished_at
    run = [(j.finished_at - j.claimed_at).total_seconds() for j in done]  # type: ignore[operator]
    end: datetime = max(j.finished_at for j in done)  # type: ignore[type-var]
    span = end - min(j.created_at for j in done)
    # steady state: once every worker has finished its first job (and imported torch)
    warm: datetime = max(runs[0].finished_at for runs in by_worker.values())  # type: ignore[type-var]
    after = sum(1 for j in done if j.claimed_at >= warm)  # type: ignore[operator]
    steady = after / (end - warm).total_seconds() if end > warm else float("nan")
    return {
        "done": len(done),
        "succeeded": sum(j.state == JobState.succeeded for j in jobs),
        "jobs_s": len(done) / span.total_seconds(),
        "steady": steady,
        "claim_p50": ms(pct(claim, 0.5)),
        "claim_p95": ms(pct(claim, 0.95)),
        "epoch_p50": ms(pct(to_epoch, 0.5)),
        "epoch_first": ms(max(first_to_epoch, default=float("nan"))),
        "run_p50": ms(statistics.median(run)),
        "run_p95": ms(pct(run, 0.95)),
        "wall": span.total_seconds(),
    }


def bench(workers: int, jobs: int, database_url: str | None, deadline: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-queue-") as tmp:
        home = Path(tmp)
        url = database_url or f"sqlite:///{home / 'kiln.db'}"
        migrate(url)
        db = Database(url)
        procs = start_workers(workers, home, url)
        try:
            wait_idle(home, workers, max(1.0, deadline - time.monotonic()))
            ids = submit(db, f"bench-{os.getpid()}-{workers}w", jobs)
            finished = wait_done(db, ids, deadline)
            result = measure(db, ids)
            result["timed_out"] = not finished
            return result
        finally:
            stop_workers(procs)
            db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temp home")
    parser.add_argument("--timeout", type=float, default=300, help="seconds, all runs together")
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    engine = (args.database_url or "sqlite").split(":", 1)[0].split("+", 1)[0]
    print(
        f"kiln queue: {args.jobs} train jobs (linear on sklearn:iris, 1 epoch), {engine}, "
        f"{os.cpu_count()} CPUs, default poll 0.2 s / heartbeat 2 s"
    )
    header = (
        f"{'workers':>7} {'done':>5} {'jobs/s':>7} {'steady':>7} "
        f"{'claim p50':>10} {'claim p95':>10} "
        f"{'->epoch1 p50':>13} {'1st job max':>12} {'run p50':>8} {'run p95':>8} {'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    for workers in args.workers:
        if time.monotonic() >= deadline:
            print(f"{workers:>7} skipped: --timeout reached")
            continue
        r = bench(workers, args.jobs, args.database_url, deadline)
        note = "  (timed out)" if r["timed_out"] else ""
        print(
            f"{workers:>7} {r['done']:>5} {r['jobs_s']:>7.1f} {r['steady']:>7.1f} "
            f"{r['claim_p50']:>8.1f}ms "
            f"{r['claim_p95']:>8.1f}ms {r['epoch_p50']:>11.1f}ms {r['epoch_first']:>10.0f}ms "
            f"{r['run_p50']:>6.0f}ms {r['run_p95']:>6.0f}ms {r['wall']:>7.1f}{note}",
            flush=True,
        )
    print(
        "jobs/s: all jobs over first created -> last finished; steady: once every worker "
        "finished its first job.\nclaim: a free worker's wait for its next job; ->epoch1: "
        "claim to first epoch (a worker's first job, which imports torch, apart as "
        "'1st job max'); run: claim to finished"
    )


if __name__ == "__main__":
    main()
