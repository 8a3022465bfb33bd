"""The job queue on both engines: atomic claims, heartbeats, recovery, lease fencing,
cancellation, the per-epoch series, and the migrations matching the table metadata."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from kiln.errors import ConflictError
from kiln.jobs.queue import (
    Lease,
    LeaseLost,
    Queue,
    epoch_series,
    job_logs,
    new_job,
    request_cancel,
)
from kiln.lifecycle import FINAL_STATES, JobKind, JobState
from kiln.store.db import Database, migrate
from kiln.store.projects import ensure_project
from kiln.store.tables import Base, Job, utcnow

TIMEOUT = 10.0  # the queue's heartbeat timeout in these tests; recovery is driven by `now`
SPEC: dict[str, Any] = {"name": "m", "data": {"source": "sklearn:iris", "target": "target"}}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'kiln.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    migrate(url)
    return url


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def queue(db: Database) -> Queue:
    return Queue(db, heartbeat_timeout=TIMEOUT)


def submit(db: Database, n: int = 1, *, max_attempts: int = 3) -> list[str]:
    with db.session() as session:
        project = ensure_project(session, "default")
        return [
            new_job(session, project, JobKind.train, SPEC, max_attempts=max_attempts).id
            for _ in range(n)
        ]


def load(db: Database, job_id: str) -> Job:
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def later() -> Any:
    """A moment past the heartbeat timeout of every lease taken so far."""
    return utcnow() + timedelta(seconds=TIMEOUT + 1)


# --- claims -------------------------------------------------------------------------


def drain_queue(queue: Queue, worker_id: str, start: Any = None) -> list[str]:
    if start is not None:
        start.wait()
    claimed = []
    while (got := queue.claim(worker_id)) is not None:
        lease, job = got
        assert lease.job_id == job.id and lease.worker_id == worker_id and lease.attempt == 1
        claimed.append(job.id)
    return claimed


def check_each_claimed_once(db: Database, job_ids: list[str], claims: list[list[str]]) -> None:
    counts = Counter(job_id for claimed in claims for job_id in claimed)
    assert set(counts) == set(job_ids)
    assert max(counts.values()) == 1, [j for j, c in counts.items() if c > 1]
    with db.session() as session:
        rows = session.scalars(select(Job).where(Job.id.in_(job_ids))).all()
    assert {row.state for row in rows} == {JobState.running}
    assert {row.attempts for row in rows} == {1}
    # the row names the claimer that got it
    owner = {job_id: f"w{i}" for i, claimed in enumerate(claims) for job_id in claimed}
    assert {row.id: row.worker_id for row in rows} == owner


def test_claim_takes_the_oldest_job_then_nothing(queue: Queue, db: Database) -> None:
    first, second = submit(db, 2)
    got = queue.claim("w")
    assert got is not None
    lease, job = got
    assert (job.id, job.state, job.attempts, job.worker_id) == (first, JobState.running, 1, "w")
    assert lease == Lease(first, "w", 1)
    assert job.claimed_at is not None and job.started_at is not None
    again = queue.claim("w")
    assert again is not None and again[1].id == second
    assert queue.claim("w") is None
    assert "attempt 1 started on w" in [log.message for log in job_logs_of(db, first)]


def test_racing_threads_claim_each_job_exactly_once(queue: Queue, db: Database) -> None:
    job_ids = submit(db, 40)
    claimers = 6
    start = threading.Barrier(claimers)
    claims: list[list[str]] = [[] for _ in range(claimers)]

    def claimer(i: int) -> None:
        claims[i] = drain_queue(queue, f"w{i}", start)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    check_each_claimed_once(db, job_ids, claims)


def _claim_in_process(url: str, worker_id: str, start: Any, out: Any) -> None:
    """Runs in a spawned process: its own engine, claiming until the queue is empty."""
    db = Database(url)
    try:
        out.put((worker_id, drain_queue(Queue(db, heartbeat_timeout=TIMEOUT), worker_id, start)))
    except BaseException as exc:
        out.put((worker_id, repr(exc)))
        raise
    finally:
        db.dispose()


@pytest.mark.e2e
def test_racing_processes_claim_each_job_exactly_once(db_url: str, db: Database) -> None:
    job_ids = submit(db, 40)
    claimers = 3
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(claimers), ctx.Queue()
    procs = [
        ctx.Process(target=_claim_in_process, args=(db_url, f"w{i}", start, out))
        for i in range(claimers)
    ]
    for proc in procs:
        proc.start()
    try:
        results = dict(out.get(timeout=60) for _ in procs)
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    errors = {w: r for w, r in results.items() if isinstance(r, str)}
    assert not errors
    assert all(proc.exitcode == 0 for proc in procs)
    check_each_claimed_once(db, job_ids, [results[f"w{i}"] for i in range(claimers)])


# --- heartbeat and recovery -----------------------------------------------------------


def job_logs_of(db: Database, job_id: str) -> list[Any]:
    with db.session() as session:
        return job_logs(session, job_id)


def test_heartbeat_renews_the_lease(queue: Queue, db: Database) -> None:
    (job_id,) = submit(db)
    got = queue.claim("w")
    assert got is not None
    lease = got[0]
    before = load(db, job_id).heartbeat_at
    assert queue.heartbeat(lease) is False
    after = load(db, job_id).heartbeat_at
    assert before is not None and after is not None and after >= before
    # a job whose heartbeat is fresh is not recovered, even past the first beat's timeout
    assert queue.recover(now=after + timedelta(seconds=TIMEOUT / 2)) == ([], [])
    assert load(db, job_id).state == JobState.running


def test_recover_requeues_a_silent_job_and_the_next_claim_is_attempt_two(
    queue: Queue, db: Database
) -> None:
    (job_id,) = submit(db)
    assert queue.claim("a") is not None
    assert queue.recover() == ([], [])  # not silent yet
    assert queue.recover(now=later()) == ([job_id], [])
    job = load(db, job_id)
    assert (job.state, job.attempts, job.worker_id, job.finished_at) == (
        JobState.queued,
        1,
        None,
        None,
    )
    assert any("re-queued" in log.message for log in job_logs_of(db, job_id))
    got = queue.claim("b")
    assert got is not None
    assert got[0] == Lease(job_id, "b", 2)
    assert got[1].attempts == 2


def test_recover_fails_a_silent_job_out_of_attempts(queue: Queue, db: Database) -> None:
    (job_id,) = submit(db, max_attempts=2)
    for worker in ("a", "b"):
        assert queue.claim(worker) is not None
        queue.recover(now=later())
    job = load(db, job_id)
    assert (job.state, job.attempts, job.worker_id) == (JobState.failed, 2, None)
    assert job.finished_at is not None
    assert job.error is not None and job.error["code"] == "worker_lost"
    assert "attempt 2 of 2" in job.error["message"]
    assert queue.claim("c") is None


def test_recover_cancels_a_silent_job_that_was_asked_to_stop(queue: Queue, db: Database) -> None:
    (job_id,) = submit(db)
    assert queue.claim("a") is not None
    with db.session() as session:
        request_cancel(session, session.get(Job, job_id))  # type: ignore[arg-type]
    assert queue.recover(now=later()) == ([], [job_id])
    job = load(db, job_id)
    assert (job.state, job.error) == (JobState.cancelled, None)
    assert job.finished_at is not None
    assert queue.claim("b") is None


# --- lease fencing --------------------------------------------------------------------


def test_a_worker_presumed_dead_cannot_overwrite_the_new_attempt(
    queue: Queue, db: Database
) -> None:
    (job_id,) = submit(db)
    got_a = queue.claim("a")
    assert got_a is not None
    lease_a = got_a[0]
    queue.record_epoch(lease_a, {"epoch": 1, "train_loss": 1.0}, 5)
    queue.recover(now=later())
    got_b = queue.claim("b")
    assert got_b is not None
    lease_b = got_b[0]
    queue.record_epoch(lease_b, {"epoch": 2, "train_loss": 0.5}, 5)

    with pytest.raises(LeaseLost):
        queue.heartbeat(lease_a)
    with pytest.raises(LeaseLost):
        queue.record_epoch(lease_a, {"epoch": 3, "train_loss": 9.0}, 5)
    with pytest.raises(LeaseLost), db.session() as session:
        queue.finish(session, lease_a, JobState.failed, error={"code": "x", "message": "old"})
    with pytest.raises(LeaseLost):
        queue.set_progress(lease_a, {"epoch": 99})
    queue.release(lease_a, "old worker shutting down")  # a no-op for a lost lease

    job = load(db, job_id)
    assert (job.state, job.worker_id, job.attempts, job.error) == (JobState.running, "b", 2, None)
    assert job.progress == {"epoch": 2, "epochs": 5}
    assert job.metrics == {"train_loss": 0.5}
    with db.session() as session:
        # nothing of the failed finish was committed, and the rejected epoch left no row
        assert [(e["epoch"], e["attempt"]) for e in epoch_series(session, job_id)] == [
            (1, 1),
            (2, 2),
        ]
    # B still holds the job and finishes it
    assert queue.heartbeat(lease_b) is False
    with db.session() as session:
        queue.finish(session, lease_b, JobState.succeeded, result={"ok": True})
    job = load(db, job_id)
    assert (job.state, job.result) == (JobState.succeeded, {"ok": True})
    with pytest.raises(LeaseLost):
        queue.heartbeat(lease_b)  # a finished job holds no lease


def test_release_puts_the_job_back_for_another_attempt(queue: Queue, db: Database) -> None:
    (job_id,) = submit(db)
    got = queue.claim("a")
    assert got is not None
    queue.release(got[0], "shutdown")
    job = load(db, job_id)
    assert (job.state, job.worker_id, job.attempts) == (JobState.queued, None, 1)
    got = queue.claim("b")
    assert got is not None and got[0] == Lease(job_id, "b", 2)


# --- cancellation ---------------------------------------------------------------------


def test_cancel_a_queued_job(queue: Queue, db: Database) -> None:
    (job_id,) = submit(db)
    with db.session() as session:
        job = request_cancel(session, session.get(Job, job_id))  # type: ignore[arg-type]
        assert job.state == JobState.cancelled
    job = load(db, job_id)
    assert job.state == JobState.cancelled and job.finished_at is not None
    assert queue.claim("w") is None


def test_cancel_a_running_job_is_seen_by_its_heartbeat(queue: Queue, db: Database) -> None:
    (job_id,) = submit(db)
    got = queue.claim("w")
    assert got is not None
    lease = got[0]
    assert queue.heartbeat(lease) is False
    with db.session() as session:
        job = request_cancel(session, session.get(Job, job_id))  # type: ignore[arg-type]
        assert job.state == JobState.running and job.cancel_requested
    assert queue.heartbeat(lease) is True
    with db.session() as session:
        queue.finish(session, lease, JobState.cancelled)
    assert load(db, job_id).state == JobState.cancelled


@pytest.mark.parametrize("end", sorted(FINAL_STATES))
def test_cancel_a_finished_job_is_a_conflict(queue: Queue, db: Database, end: JobState) -> None:
    (job_id,) = submit(db)
    got = queue.claim("w")
    assert got is not None
    with db.session() as session:
        queue.finish(session, got[0], end)
    with pytest.raises(ConflictError), db.session() as session:
        request_cancel(session, session.get(Job, job_id))  # type: ignore[arg-type]
    job = load(db, job_id)
    assert (job.state, job.cancel_requested) == (end, False)


def test_a_job_kind_is_stored_as_its_value_and_an_unknown_one_is_refused(db: Database) -> None:
    with db.session() as session:
        project = ensure_project(session, "default")
        job_id = new_job(session, project, "crossval", SPEC, max_attempts=1).id
        with pytest.raises(ValueError, match="'deploy'"):
            new_job(session, project, "deploy", SPEC, max_attempts=1)
    assert load(db, job_id).kind == JobKind.crossval == "crossval"


# --- the per-epoch series -------------------------------------------------------------


def test_a_resumed_attempt_overrides_the_epochs_it_ran_again(queue: Queue, db: Database) -> None:
    (job_id,) = submit(db)
    got = queue.claim("a")
    assert got is not None
    for epoch in (1, 2, 3):
        queue.record_epoch(got[0], {"epoch": epoch, "train_loss": 10.0 + epoch}, 4)
    queue.recover(now=later())
    got = queue.claim("b")
    assert got is not None
    # the checkpoint was of epoch 2: attempt 2 re-runs epoch 3, then runs 4
    for epoch in (3, 4):
        queue.record_epoch(got[0], {"epoch": epoch, "train_loss": 20.0 + epoch}, 4)
    with db.session() as session:
        series = epoch_series(session, job_id)
    assert [(e["epoch"], e["attempt"], e["train_loss"]) for e in series] == [
        (1, 1, 11.0),
        (2, 1, 12.0),
        (3, 2, 23.0),
        (4, 2, 24.0),
    ]


# --- migrations -----------------------------------------------------------------------


def test_the_migrations_create_exactly_the_tables_module(db: Database) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], "store/tables.py and the migrations differ; add a migration:\n" + "\n".join(
        map(str, diff)
    )


def test_migrate_is_idempotent(db_url: str) -> None:
    migrate(db_url)
    migrate(db_url)
