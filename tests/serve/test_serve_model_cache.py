"""Loaded models leave memory when no deployment uses them any more.

Through the real app (FastAPI's TestClient runs its lifespan and the real
DeploymentManager), a version swapped out of a deployment, or a deleted deployment's
version, must be released: a weak reference to its loaded model dies after a
collection, and its local copy of the bundle is gone. A model shared by two
deployments stays while one of them still routes to it.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from serve_support import Home, bearer, rows

API = "/api/v1"


@pytest.fixture
def client(home_copy: Home) -> Iterator[TestClient]:
    from kiln.app import create_app

    with TestClient(create_app(home_copy.settings())) as c:
        c.headers.update(bearer(home_copy.admin))
        yield c


def _deploy(client: TestClient, name: str, version: int) -> None:
    r = client.post(f"{API}/deployments", json={"name": name, "model": "iris", "version": version})
    assert r.status_code == 201, r.text
    _predict(client, name, version)


def _predict(client: TestClient, name: str, version: int) -> None:
    r = client.post(f"{API}/deployments/{name}/predict", json={"inputs": rows(3)})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == version


def _loaded(client: TestClient, name: str) -> tuple[Any, Path]:
    """A weak reference to the deployment's (only) loaded model, and its local copy
    (the only version loaded when called)."""
    manager = client.app.state.deployments  # type: ignore[attr-defined]
    (live,) = [d for d in manager.live.values() if d.name == name]
    (route,) = live.routes
    model = route.batcher.model
    # each loaded version has one folder there, named by its id: only this one now
    (copy,) = [p for p in manager.cache_dir.iterdir() if not p.name.startswith(".")]
    return weakref.ref(model), copy


def _dead(ref: Any) -> bool:
    gc.collect()
    return ref() is None


def test_a_swapped_out_version_is_released(client: TestClient) -> None:
    _deploy(client, "swap", 1)
    v1, v1_copy = _loaded(client, "swap")
    torch_module = weakref.ref(v1().bundle.model)  # the weights themselves
    r = client.patch(f"{API}/deployments/swap", json={"version": 2})
    assert r.status_code == 200, r.text
    _predict(client, "swap", 2)
    assert _dead(v1), "version 1's model is still referenced after the swap"
    assert _dead(torch_module)
    assert not v1_copy.exists()
    v2, _ = _loaded(client, "swap")
    assert v2() is not None  # the version in use stays loaded
    # rolling back loads version 1 again, from the artifact store
    r = client.patch(f"{API}/deployments/swap", json={"version": 1})
    assert r.status_code == 200, r.text
    _predict(client, "swap", 1)
    assert _dead(v2)


def test_a_shared_model_stays_until_its_last_deployment_is_deleted(client: TestClient) -> None:
    _deploy(client, "first", 2)
    _deploy(client, "second", 2)
    model, copy = _loaded(client, "first")
    assert _loaded(client, "second")[0]() is model()  # loaded once, shared
    r = client.delete(f"{API}/deployments/first")
    assert r.status_code == 204, r.text
    assert not _dead(model), "a model still in use by 'second' was released"
    assert copy.exists()
    _predict(client, "second", 2)
    r = client.delete(f"{API}/deployments/second")
    assert r.status_code == 204, r.text
    assert _dead(model), "the deleted deployments' model is still referenced"
    assert not copy.exists()


def test_a_version_that_fails_to_load_leaves_no_decrypted_copy(home_copy: Home) -> None:
    """Its files decrypt one by one; a later one fails its tag: nothing stays on disk."""
    from kiln.app import create_app

    files = sorted(p for p in home_copy.artifact_dir(2).rglob("*") if p.is_file())
    last = files[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF  # the last segment's tag no longer verifies
    last.write_bytes(bytes(data))
    with TestClient(create_app(home_copy.settings())) as c:
        c.headers.update(bearer(home_copy.admin))
        r = c.post(f"{API}/deployments", json={"name": "bad", "model": "iris", "version": 2})
        assert r.status_code >= 400, r.text
        manager = c.app.state.deployments  # type: ignore[attr-defined]
        assert not manager.cache_dir.exists() or list(manager.cache_dir.iterdir()) == []
        _deploy(c, "good", 1)
        cache = manager.cache_dir
        assert list(cache.iterdir())
    assert not cache.exists()  # a clean shutdown removes every decrypted copy
