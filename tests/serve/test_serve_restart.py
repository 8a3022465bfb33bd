"""Deployments outlive the server: a new process on the same home brings them back.

Each ``serve`` here builds its own services from the settings, as ``kiln up`` does, so
stopping one and starting another on the same KILN_HOME is a real restart.
"""

from __future__ import annotations

import shutil
from typing import Any

import httpx
from serve_support import Home, bearer, rows, serve

from support import wait_for_http

API = "/api/v1"


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers=bearer(key), timeout=60)


def routes_of(deployment: dict[str, Any]) -> list[tuple[int, int]]:
    return sorted((r["version"], r["weight"]) for r in deployment["routes"])


def test_a_restarted_server_restores_deployments_routes_and_settings(home_copy: Home) -> None:
    settings = home_copy.settings()
    with serve(settings) as url, client(url, home_copy.admin) as admin:
        r = admin.post(
            f"{API}/deployments",
            json={"name": "kept", "model": "iris", "version": 1, "max_batch_size": 8},
        )
        assert r.status_code == 201, r.text
        r = admin.patch(
            f"{API}/deployments/kept",
            json={
                "routes": [{"version": 1, "weight": 70}, {"version": 2, "weight": 30}],
                "timeout_ms": 2500,
            },
        )
        assert r.status_code == 200, r.text
        before = r.json()
        for name in ("gone", "single"):
            r = admin.post(f"{API}/deployments", json={"name": name, "model": "iris"})
            assert r.status_code == 201, r.text
        assert admin.delete(f"{API}/deployments/gone").status_code == 204

    with (
        serve(settings) as url,
        client(url, home_copy.admin) as admin,
        client(url, home_copy.keys["predict"]) as predictor,
    ):
        wait_for_http(f"{url}/readyz", timeout=10)
        assert httpx.get(f"{url}/readyz").json() == {"ready": True}
        listed = {d["name"]: d for d in admin.get(f"{API}/deployments").json()}
        assert sorted(listed) == ["kept", "single"]
        kept = listed["kept"]
        assert kept["state"] == "ready"
        assert routes_of(kept) == routes_of(before) == [(1, 70), (2, 30)]
        for setting in ("max_batch_size", "max_delay_ms", "max_queue", "timeout_ms", "backend"):
            assert kept[setting] == before[setting], setting
        assert kept["max_batch_size"] == 8 and kept["timeout_ms"] == 2500
        assert routes_of(listed["single"]) == [(2, 100)]  # "latest" stays the version it was
        seen = set()
        for i in range(40):
            r = predictor.post(f"{API}/deployments/kept/predict", json={"inputs": rows(2, i)})
            assert r.status_code == 200, r.text
            seen.add(r.json()["version"])
        assert seen <= {1, 2} and 1 in seen
        r = predictor.get("/v2/models/single/ready")
        assert r.status_code == 200 and r.json()["ready"] is True


def test_a_deployment_that_cannot_be_restored_is_failed_until_fixed(home_copy: Home) -> None:
    settings = home_copy.settings()
    with serve(settings) as url, client(url, home_copy.admin) as admin:
        r = admin.post(
            f"{API}/deployments", json={"name": "fragile", "model": "iris", "version": 2}
        )
        assert r.status_code == 201, r.text
        r = admin.post(f"{API}/deployments", json={"name": "sturdy", "model": "iris", "version": 1})
        assert r.status_code == 201, r.text
    # version 2's bundle disappears from the artifact store; the server kept no copy
    # (its decrypted copies lived in its scratch folder, removed when it stopped)
    shutil.rmtree(home_copy.artifact_dir(2))
    assert not any((home_copy.path / "scratch").glob("*/deployments"))

    with (
        serve(settings) as url,
        client(url, home_copy.admin) as admin,
        client(url, home_copy.keys["predict"]) as predictor,
    ):
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json() == {"ready": False}
        fragile = admin.get(f"{API}/deployments/fragile").json()
        assert fragile["state"] == "failed" and fragile["error"]
        assert fragile["routes"] == []
        r = predictor.post(f"{API}/deployments/fragile/predict", json={"inputs": rows(1)})
        assert r.status_code >= 400 and "error" in r.json()
        assert predictor.get("/v2/models/fragile/ready").json()["ready"] is False
        # the other deployment is unaffected
        r = predictor.post(f"{API}/deployments/sturdy/predict", json={"inputs": rows(1)})
        assert r.status_code == 200 and r.json()["version"] == 1
        # a hot swap to a version that exists repairs it
        r = admin.patch(f"{API}/deployments/fragile", json={"version": 1})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "ready"
        assert httpx.get(f"{url}/readyz").status_code == 200
        r = predictor.post(f"{API}/deployments/fragile/predict", json={"inputs": rows(1)})
        assert r.status_code == 200 and r.json()["version"] == 1
