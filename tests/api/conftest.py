"""The REST API driven in-process: SQLite + a local artifact store under tmp_path.

``platform`` is a fresh, empty server (a bootstrapped admin key, nothing else) for
tests that count rows or audit events; ``world`` is one shared, already-trained
server (two projects, several keys, finished jobs and registered versions) for tests
that only read it or touch resources of their own. Every 4xx answer either client
sees is checked against the one error shape, whichever test triggered it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from kiln.app import build_services, create_app
from kiln.jobs.worker import Worker
from kiln.server import bootstrap
from kiln.services import Services
from kiln.settings import Settings

API = "/api/v1"


def check_error_shape(response: httpx.Response) -> None:
    """A 4xx body is exactly ``{"error": {"code", "message", "field"}}``; on the
    OpenAI-compatible routes (``/v1/``) OpenAI's ``{"error": {"message", "type", "param",
    "code"}}``, which its client reads."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    if response.request.url.path.startswith("/v1/"):
        assert set(error) == {"message", "type", "param", "code"}, body
        assert isinstance(error["message"], str) and error["message"], body
        return
    assert set(error) == {"code", "message", "field"}, body
    assert isinstance(error["code"], str) and error["code"], body
    assert isinstance(error["message"], str) and error["message"], body
    assert error["field"] is None or isinstance(error["field"], str), body


class CheckedClient(TestClient):
    """A TestClient that checks the error shape of every 4xx it receives."""

    def request(self, *args: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        response = super().request(*args, **kwargs)
        if 400 <= response.status_code < 500:
            check_error_shape(response)
        return response


@functools.cache
def sklearn_csv(name: str) -> bytes:
    """A scikit-learn toy table as CSV bytes (its label column is ``target``)."""
    from sklearn import datasets

    loader = {"iris": datasets.load_iris, "wine": datasets.load_wine}[name]
    return loader(as_frame=True).frame.to_csv(index=False).encode()


def train_spec(
    source: str, name: str = "iris", epochs: int = 2, **overrides: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "task": "classification",
        "data": {"source": source, "target": "target"},
        "model": {"type": "mlp", "hidden": [8]},
        "train": {"epochs": epochs, "device": "cpu"},
    }
    spec.update(overrides)
    return spec


class Platform:
    """One server: its settings, services, a client and helpers for the usual calls."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.svc: Services = build_services(settings)
        admin = bootstrap(self.svc)
        assert admin is not None
        self.admin = admin
        self.client = CheckedClient(create_app(settings, services=self.svc))

    csv = staticmethod(sklearn_csv)
    spec = staticmethod(train_spec)

    # -- calls -------------------------------------------------------------------------
    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def get(self, path: str, key: str, **params: Any) -> httpx.Response:
        return self.client.get(API + path, headers=self.auth(key), params=params)

    def post(self, path: str, key: str, json: Any = None, **params: Any) -> httpx.Response:
        return self.client.post(API + path, headers=self.auth(key), json=json, params=params)

    def put(self, path: str, key: str, json: Any = None, **params: Any) -> httpx.Response:
        return self.client.put(API + path, headers=self.auth(key), json=json, params=params)

    def delete(self, path: str, key: str, **params: Any) -> httpx.Response:
        return self.client.delete(API + path, headers=self.auth(key), params=params)

    def create_project(self, name: str) -> None:
        r = self.post("/projects", self.admin, {"name": name})
        assert r.status_code == 201, r.text

    def create_key(self, project: str | None, scopes: list[str], name: str = "") -> str:
        """A new key's full secret (``project=None``: another global key)."""
        r = self.post("/keys", self.admin, {"project": project, "scopes": scopes, "name": name})
        assert r.status_code == 201, r.text
        key: str = r.json()["key"]
        return key

    def upload(
        self,
        key: str,
        data: bytes,
        filename: str = "iris.csv",
        *,
        name: str | None = None,
        project: str | None = None,
    ) -> httpx.Response:
        return self.client.post(
            f"{API}/datasets",
            headers=self.auth(key),
            files={"file": (filename, data, "text/csv")},
            data={"name": name} if name is not None else None,
            params={"project": project} if project else None,
        )

    def dataset(self, key: str, table: str = "iris", project: str | None = None) -> str:
        """Upload a toy table; its ``dataset:<id>`` reference."""
        r = self.upload(key, sklearn_csv(table), f"{table}.csv", project=project)
        assert r.status_code == 201, r.text
        ref: str = r.json()["ref"]
        return ref

    def submit(
        self, key: str, kind: str, spec: dict[str, Any], project: str | None = None, **extra: Any
    ) -> httpx.Response:
        params = {"project": project} if project else {}
        return self.post("/jobs", key, {"kind": kind, "spec": spec, **extra}, **params)

    def queued(self, key: str, kind: str, spec: dict[str, Any], **extra: Any) -> str:
        """Submit a job that must be accepted; its id."""
        r = self.submit(key, kind, spec, **extra)
        assert r.status_code == 201, r.text
        assert r.json()["state"] == "queued"
        job_id: str = r.json()["id"]
        return job_id

    def run_jobs(self) -> None:
        """Run every queued job to its end, here and now."""
        Worker(self.settings, db=self.svc.db, store=self.svc.store).run(until_idle=True)

    # -- looking behind the API --------------------------------------------------------
    def count(self, table: Any) -> int:
        with self.svc.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(table)) or 0)

    def artifact_files(self) -> dict[str, bytes]:
        """Every file in the artifact store (relative path -> bytes, decrypted by the
        store; a stray temporary file as it is on disk)."""
        root = Path(self.settings.resolved_artifacts)
        if not root.exists():
            return {}
        return {
            str(p.relative_to(root)): (
                p.read_bytes()
                if p.name.startswith(".")
                else self.svc.store.get_bytes(str(p.relative_to(root)))
            )
            for p in root.rglob("*")
            if p.is_file()
        }

    def close(self) -> None:
        self.client.close()
        self.svc.db.dispose()


@pytest.fixture
def make_platform(tmp_path: Path) -> Iterator[Callable[..., Platform]]:
    """``make_platform(max_upload_mb=0.01, ...)``: a fresh server with those settings."""
    made: list[Platform] = []

    def make(**settings: Any) -> Platform:
        made.append(Platform(Settings(home=tmp_path / f"home{len(made)}", **settings)))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture
def platform(make_platform: Callable[..., Platform]) -> Platform:
    """A fresh server with only the default project and the bootstrap admin key."""
    return make_platform()


class World(Platform):
    """The shared trained server; attributes name its keys, datasets, jobs."""

    keys: dict[str, str]
    refs: dict[str, str]
    jobs: dict[str, str]


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Projects ``alpha`` and ``beta`` with data, finished jobs and registered versions.

    alpha: iris dataset, model ``iris`` v1 and v2 (train jobs ``train1``, ``train2``),
    a 2-fold ``crossval`` job and an ``evaluate`` job of iris v1.
    beta: wine dataset, model ``wine`` v1 (job ``beta_train``) with alias ``production``.
    Tests may add resources of their own but must not change these. The per-key rate
    limits are off: tests (and the probes of tests/security) send bursts with one key,
    and a 429 would stand in for the answer under test; the limits have tests of their own.
    """
    home = tmp_path_factory.mktemp("world") / "home"
    w = World(Settings(home=home, rate_limit_api="off", rate_limit_inference="off"))
    w.create_project("alpha")
    w.create_project("beta")
    w.keys = {
        "alpha_admin": w.create_key("alpha", ["admin"]),
        "alpha_read": w.create_key("alpha", ["read"]),
        "alpha_train": w.create_key("alpha", ["read", "train"]),
        "alpha_deploy": w.create_key("alpha", ["read", "deploy"]),
        "beta_admin": w.create_key("beta", ["admin"]),
    }
    alpha, beta = w.keys["alpha_train"], w.keys["beta_admin"]
    w.refs = {"alpha": w.dataset(alpha, "iris"), "beta": w.dataset(beta, "wine")}
    w.jobs = {
        "train1": w.queued(alpha, "train", train_spec(w.refs["alpha"], epochs=2)),
        "train2": w.queued(alpha, "train", train_spec(w.refs["alpha"], epochs=3)),
        "crossval": w.queued(alpha, "crossval", train_spec(w.refs["alpha"]), folds=2),
        "beta_train": w.queued(beta, "train", train_spec(w.refs["beta"], name="wine")),
    }
    w.run_jobs()
    w.jobs["evaluate"] = w.queued(
        alpha, "evaluate", {"model": "iris", "version": 1, "data": w.refs["alpha"]}
    )
    w.run_jobs()
    r = w.put("/models/wine/aliases/production", beta, {"version": 1})
    assert r.status_code == 200, r.text
    yield w
    w.close()
