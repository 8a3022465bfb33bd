"""A train job that loses the race for its version number: retried, then failed clearly.

Registration takes ``max(version) + 1``. Here the database really refuses the job's
insert: on PostgreSQL a rival registration of the same model commits from another
session between the job's read of the maximum and its insert (the race as it happens
between two workers); on SQLite, whose ``BEGIN IMMEDIATE`` serialises writers so that
race cannot happen, a row with the same (model, version) is inserted first in the job's
own transaction, so the unique constraint rejects the job's row. Losing every attempt
must fail the job (409-style ``conflict`` error, nothing registered, its bundle and
checkpoint gone); losing fewer must register the next free number.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from test_worker import Platform, make_platform

from kiln.lifecycle import JobState
from kiln.settings import Settings
from kiln.store.db import Database
from kiln.store.projects import ensure_project
from kiln.store.registry import REGISTER_ATTEMPTS, get_model, register_version
from kiln.store.tables import Job, ModelVersion

CHECKPOINT = "projects/default/jobs/{}/checkpoint.pt"


def _rival_registers(db: Database, name: str, job_id: str = "rival") -> int:
    """Another registration of model ``name``, committed from its own session."""
    with db.session() as session:
        project = ensure_project(session, "default")
        return register_version(
            session,
            project,
            name,
            artifact_key=f"projects/default/models/{name}/{job_id}",
            task="classification",
            metrics={},
            summary={},
            size_bytes=0,
            job_id=job_id,
        ).version


def _is_version_insert(statement: str) -> bool:
    return statement.lstrip().upper().startswith("INSERT INTO MODEL_VERSIONS")


def _postgres_rival(platform: Platform, times: int) -> list[int]:
    """Just before each of the job's first ``times`` inserts of a version, a rival
    commits that very number from another connection. Returns the rival's versions."""
    rival_db = Database(platform.settings.resolved_database_url)
    won: list[int] = []

    @event.listens_for(platform.db.engine, "before_cursor_execute")
    def _race(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if _is_version_insert(statement) and len(won) < times:
            won.append(_rival_registers(rival_db, "wine", f"rival{len(won)}"))

    return won


def _sqlite_rival(platform: Platform, times: int) -> list[int]:
    """Just before each of the job's first ``times`` inserts of a version, the same
    (model, version) is inserted first on the job's own connection (rolled back with
    the job's transaction). Returns the version numbers taken."""
    taken: list[int] = []

    @event.listens_for(platform.db.engine, "before_cursor_execute")
    def _race(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if not _is_version_insert(statement) or len(taken) >= times:
            return
        columns = [c.strip() for c in re.search(r"\(([^)]*)\)", statement)[1].split(",")]  # type: ignore[index]
        row = list(parameters)
        row[columns.index("id")] = f"mv_rival{len(taken)}"
        taken.append(int(row[columns.index("version")]))
        cursor.connection.cursor().execute(statement, row)

    return taken


@pytest.fixture
def sqlite_platform(tmp_path: Path) -> Iterator[Platform]:
    made = make_platform(tmp_path, Settings(home=tmp_path / "home", heartbeat_seconds=0.1))
    yield made
    made.db.dispose()


@pytest.fixture
def postgres_platform(postgres_url: str, tmp_path: Path) -> Iterator[Platform]:
    settings = Settings(home=tmp_path / "home", database_url=postgres_url, heartbeat_seconds=0.1)
    made = make_platform(tmp_path, settings)
    yield made
    made.db.dispose()


def _run(platform: Platform) -> Job:
    job_id = platform.submit(epochs=1)
    platform.worker().run(until_idle=True)
    return platform.job(job_id)


def _versions(platform: Platform) -> dict[int, str | None]:
    with platform.db.session() as session:
        project = ensure_project(session, "default")
        model = get_model(session, project, "wine")
        rows = session.scalars(select(ModelVersion).where(ModelVersion.model_id == model.id))
        return {row.version: row.job_id for row in rows}


def _check_failed(platform: Platform, job: Job) -> None:
    assert job.state == JobState.failed, (job.state, job.result)
    assert job.error is not None and job.error["code"] == "conflict", job.error
    assert "could not register a version of model 'wine'" in job.error["message"]
    assert job.model_version_id is None and job.finished_at is not None
    assert platform.logs(job.id)[-1].startswith("failed: could not register")
    # nothing of the attempt is left to take space: no bundle, no checkpoint
    assert platform.store.list(f"projects/default/models/wine/{job.id}") == []
    assert not platform.store.exists(CHECKPOINT.format(job.id))


def test_sqlite_losing_every_attempt_fails_the_job(sqlite_platform: Platform) -> None:
    taken = _sqlite_rival(sqlite_platform, times=REGISTER_ATTEMPTS)
    job = _run(sqlite_platform)
    assert taken == [1] * REGISTER_ATTEMPTS  # each attempt rolled back, retried, refused
    _check_failed(sqlite_platform, job)
    with sqlite_platform.db.session() as session:
        assert session.scalars(select(ModelVersion)).all() == []


def test_sqlite_losing_fewer_attempts_registers(sqlite_platform: Platform) -> None:
    _sqlite_rival(sqlite_platform, times=REGISTER_ATTEMPTS - 1)
    job = _run(sqlite_platform)
    assert job.state == JobState.succeeded, job.error
    assert job.result["version"] == 1
    assert _versions(sqlite_platform) == {1: job.id}


def test_postgres_losing_every_race_fails_the_job(postgres_platform: Platform) -> None:
    _rival_registers(postgres_platform.db, "wine")  # the model exists: v1
    won = _postgres_rival(postgres_platform, times=REGISTER_ATTEMPTS)
    job = _run(postgres_platform)
    assert won == [2, 3, 4]  # each retry read the new maximum and lost again
    _check_failed(postgres_platform, job)
    assert _versions(postgres_platform) == {1: "rival", 2: "rival0", 3: "rival1", 4: "rival2"}


def test_postgres_losing_fewer_races_takes_the_next_number(postgres_platform: Platform) -> None:
    _rival_registers(postgres_platform.db, "wine")
    won = _postgres_rival(postgres_platform, times=REGISTER_ATTEMPTS - 1)
    job = _run(postgres_platform)
    assert won == [2, 3]
    assert job.state == JobState.succeeded, job.error
    assert job.result["version"] == 4
    assert _versions(postgres_platform)[4] == job.id


def test_sqlite_a_compress_job_losing_every_attempt_fails(sqlite_platform: Platform) -> None:
    from kiln.jobs.queue import new_job

    trained = _run(sqlite_platform)
    assert trained.state == JobState.succeeded, trained.error
    spec = {
        "source": "model:wine@1",
        "steps": [{"prune": {"method": "unstructured", "amount": 0.2, "finetune_epochs": 0}}],
    }
    with sqlite_platform.db.session() as session:
        project = ensure_project(session, "default")
        job_id = new_job(session, project, "compress", spec, max_attempts=3).id
    taken = _sqlite_rival(sqlite_platform, times=REGISTER_ATTEMPTS)
    sqlite_platform.worker().run(until_idle=True)
    job = sqlite_platform.job(job_id)
    assert taken == [2] * REGISTER_ATTEMPTS
    assert job.state == JobState.failed, (job.state, job.result)
    assert job.error is not None and job.error["code"] == "conflict", job.error
    assert _versions(sqlite_platform) == {1: trained.id}  # no variant registered
    assert sqlite_platform.store.list(f"projects/default/models/wine/{job_id}") == []
