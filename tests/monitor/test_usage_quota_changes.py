"""A quota change applies at once on the server that made it (the very next prediction
is judged by it, with no wait), and within 5 seconds on another server sharing the
database (its cache of quotas is never older than that)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from kiln.errors import QuotaError
from kiln.monitor import usage
from kiln.monitor.metering import PredictionMeter
from kiln.store.db import Database
from kiln.store.projects import ensure_project

API = "/api/v1"
SPEC: dict[str, Any] = {
    "name": "iris",
    "task": "classification",
    "data": {"source": "sklearn:iris", "target": "target"},
    "model": {"type": "linear"},
    "train": {"epochs": 1, "device": "cpu"},
}
ROW = {
    "sepal length (cm)": 5.1,
    "sepal width (cm)": 3.5,
    "petal length (cm)": 1.4,
    "petal width (cm)": 0.2,
}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    """A server with iris deployed; its monitor never flushes on its own during the
    test, so nothing but the quota change itself can refresh its cached quotas."""
    import kiln
    from kiln.app import build_services, create_app
    from kiln.server import bootstrap
    from kiln.settings import Settings
    from kiln.store.artifacts import safe_key
    from kiln.store.registry import register_version
    from kiln.store.tables import Project

    kiln.fit(SPEC, out=tmp_path / "iris")
    settings = Settings(home=tmp_path / "home", monitor_flush_seconds=3600)
    svc = build_services(settings)
    admin = bootstrap(svc)
    assert admin is not None
    with svc.db.session() as s:
        project = s.scalar(select(Project).where(Project.name == "default"))
        assert project is not None
        key = safe_key("projects", "default", "models", "iris", "v1")
        svc.store.put_dir(key, tmp_path / "iris")
        register_version(
            s,
            project,
            "iris",
            artifact_key=key,
            task="classification",
            metrics={},
            summary={},
            size_bytes=0,
        )
    with TestClient(create_app(settings, services=svc)) as c:
        c.headers["Authorization"] = f"Bearer {admin}"
        r = c.post(f"{API}/deployments", json={"name": "iris", "model": "iris", "version": 1})
        assert r.status_code == 201, r.text
        yield c
    svc.db.dispose()


def predict(c: TestClient) -> httpx.Response:
    return c.post(f"{API}/deployments/iris/predict", json={"inputs": [ROW]})


def set_quota(c: TestClient, kind: str, limit: float | None) -> None:
    r = c.put(f"{API}/quotas", json={"kind": kind, "period": "day", "limit": limit})
    assert r.status_code == 200, r.text


def test_a_prediction_quota_set_through_the_api_applies_to_the_very_next_request(
    client: TestClient,
) -> None:
    for _ in range(3):  # the project's (empty) quotas are now cached
        assert predict(client).status_code == 200

    set_quota(client, "prediction_requests", 3)
    refused = predict(client)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["field"] == "prediction_requests"
    assert "prediction_requests per day is 3; 3 used" in error["message"]

    set_quota(client, "prediction_requests", 5)  # raised: the next one passes again
    assert predict(client).status_code == 200

    set_quota(client, "prediction_rows", 4)  # another kind, just as at once
    assert predict(client).status_code == 429

    set_quota(client, "prediction_rows", None)  # removed
    set_quota(client, "prediction_requests", None)
    assert predict(client).status_code == 200


def test_another_server_applies_a_change_within_5_seconds(db: Database) -> None:
    """Another server's meter: a cache older than 5 s is read again before a request."""
    with db.session() as s:
        pid = ensure_project(s, "default").id
    now = [0.0]

    async def scenario() -> None:
        meter = PredictionMeter(db, clock=lambda: now[0])
        await meter.prepare(pid)
        meter.reserve(pid, 1)  # no quota yet
        with db.session() as s:  # set by a server that is not this one
            usage.set_quota(s, pid, "prediction_requests", "day", 1)
        now[0] = 4.9
        await meter.prepare(pid)
        meter.reserve(pid, 1)  # still judged on the cached quotas
        now[0] = 5.1
        await meter.prepare(pid)
        with pytest.raises(QuotaError, match="prediction_requests per day is 1"):
            meter.reserve(pid, 1)

    asyncio.run(scenario())


def test_a_read_that_raced_a_change_is_not_cached(db: Database) -> None:
    """A flush that read the quotas before a change landed does not put them back."""
    with db.session() as s:
        pid = ensure_project(s, "default").id

    async def scenario() -> None:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        meter.reserve(pid, 1)
        write = meter._write

        def write_then_change(batch: Any, refresh: set[int]) -> Any:
            fresh = write(batch, refresh)  # the quotas as they were read: none
            with db.session() as s:
                usage.set_quota(s, pid, "prediction_requests", "day", 1)
                meter.invalidate_on_commit(s, pid)
            return fresh

        meter._write = write_then_change  # type: ignore[method-assign]
        await meter.flush()
        meter._write = write  # type: ignore[method-assign]
        assert meter.needs_load(pid)
        await meter.prepare(pid)
        with pytest.raises(QuotaError, match="prediction_requests per day is 1"):
            meter.reserve(pid, 1)

    asyncio.run(scenario())
