"""Fixtures of the serving tests: one trained kiln home per session (see serve_support)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from serve_support import Home, copy_home, train_spec


@pytest.fixture(scope="session")
def iris_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle trained in-process by ``kiln.fit`` (no server), for the unit tests."""
    import kiln

    out = tmp_path_factory.mktemp("iris-bundle") / "iris"
    kiln.fit(train_spec(epochs=5), out=out)
    return out


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """The template home: never served itself, only copied."""
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from kiln.app import build_services, create_app
    from kiln.jobs.worker import Worker
    from kiln.server import bootstrap
    from kiln.settings import Settings
    from kiln.store.tables import ModelVersion

    path = tmp_path_factory.mktemp("serve-template") / "home"
    settings = Settings(home=path)
    svc = build_services(settings)
    admin = bootstrap(svc)
    assert admin is not None
    keys: dict[str, str] = {}
    with TestClient(create_app(settings, services=svc)) as client:
        client.headers["Authorization"] = f"Bearer {admin}"

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            r = client.post(f"/api/v1{path}", json=body)
            assert r.status_code == 201, r.text
            out: dict[str, Any] = r.json()
            return out

        post("/projects", {"name": "other"})
        for name, project, scopes in [
            ("predict", "default", ["predict"]),
            ("read", "default", ["read"]),
            ("deploy", "default", ["read", "deploy"]),
            ("other", "other", ["read", "deploy", "predict"]),
        ]:
            keys[name] = post("/keys", {"project": project, "scopes": scopes})["key"]
        # two versions that differ: different lengths of training
        for epochs in (2, 4):
            assert post("/jobs", {"kind": "train", "spec": train_spec(epochs)})["state"] == "queued"
        Worker(settings, db=svc.db, store=svc.store, worker_id="serve-tests").run(until_idle=True)
        versions = client.get("/api/v1/models/iris/versions").json()["items"]
        assert sorted(v["version"] for v in versions) == [1, 2], versions
    with svc.db.session() as s:
        bundles = {v.version: v.artifact_key for v in s.scalars(select(ModelVersion))}
    svc.db.dispose()
    return Home(path=path, admin=admin, keys=keys, bundles=bundles)


@pytest.fixture
def home_copy(trained_home: Home, tmp_path: Path) -> Home:
    """A private copy of the trained home for one test."""
    return copy_home(trained_home, tmp_path / "home")
