"""Another project's ids answer as if they did not exist.

A key of project ``alpha`` (holding ``admin`` there, so scopes never refuse it) calls
every route of the table that takes an id or a name with project ``beta``'s dataset,
job, model, alias and deployment: each answer is a 404, the same as for an id that
exists nowhere (no oracle), and beta's resources are unchanged afterwards. Asking for
``?project=beta`` is refused, and a job cannot name beta's dataset or model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from security_routes import RouteSpec, is_v2, route_table

# what a route's path parameters mean, by the route's name
FAMILIES = {"datasets": "dataset", "jobs": "job", "models": "model", "deployments": "deployment"}
FAMILIES["v2"] = "deployment"
# valid bodies, so that only the lookup can refuse (a body is validated before the route runs)
BODIES: dict[str, Any] = {
    "models.set_alias": {"version": 1},
    "deployments.update": {"version": 1},
    "deployments.predict": {"inputs": [{"alcohol": 13.0}]},
    "v2.infer": {"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [1]}]},
}


def _id_routes() -> list[RouteSpec]:
    """The project-scoped routes that name one resource in their path."""
    return [r for r in route_table() if r.params and r.name.split(".")[0] in FAMILIES]


@pytest.fixture(scope="module")
def beta(served: Any) -> Iterator[dict[str, str]]:
    """beta's ids, a deployment of beta's model included."""
    key = served.keys["beta_admin"]
    r = served.post("/deployments", key, {"name": "wine-live", "model": "wine", "version": 1})
    assert r.status_code == 201, r.text
    yield {
        "dataset_id": served.refs["beta"].removeprefix("dataset:"),
        "job_id": served.jobs["beta_train"],
        "model": "wine",
        "deployment": "wine-live",
        "version": "1",
        "alias": "production",
    }
    assert served.delete("/deployments/wine-live", key).status_code == 204


def _values(route: RouteSpec, ids: dict[str, str]) -> dict[str, str]:
    family = FAMILIES[route.name.split(".")[0]]
    name = ids["deployment"] if family == "deployment" else ids["model"]
    return {**ids, "name": name}


def _send(served: Any, route: RouteSpec, key: str, values: dict[str, str]) -> Any:
    from fastapi.testclient import TestClient

    send = TestClient.request if is_v2(route) else type(served.client).request
    return send(
        served.client,
        route.method,
        route.url(**values),
        headers={"Authorization": f"Bearer {key}"},
        json=BODIES.get(route.name),
    )


WINE_FEATURES = [
    "alcohol",
    "malic_acid",
    "ash",
    "alcalinity_of_ash",
    "magnesium",
    "total_phenols",
    "flavanoids",
    "nonflavanoid_phenols",
    "proanthocyanins",
    "color_intensity",
    "hue",
    "od280/od315_of_diluted_wines",
    "proline",
]

NOWHERE = {
    "dataset_id": "ds_0123456789abcdef",
    "job_id": "job_0123456789abcdef",
    "model": "nosuchmodel",
    "deployment": "nosuchdeployment",
    "version": "1",
    "alias": "production",
}


@pytest.mark.parametrize("route", _id_routes(), ids=str)
def test_another_projects_id_is_404_like_a_missing_one(
    served: Any, beta: dict[str, str], route: RouteSpec
) -> None:
    alpha = served.keys["alpha_admin"]
    theirs = _send(served, route, alpha, _values(route, beta))
    assert theirs.status_code == 404, (theirs.status_code, theirs.text)
    missing = _send(served, route, alpha, _values(route, NOWHERE))
    assert missing.status_code == 404, missing.text
    if not is_v2(route):
        assert theirs.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
        assert theirs.json()["error"]["field"] == missing.json()["error"]["field"]
    if route.method == "GET":  # and beta's owner does see it
        mine = _send(served, route, served.keys["beta_admin"], _values(route, beta))
        assert mine.status_code == 200, mine.text


def test_betas_resources_survive_alphas_attempts(served: Any, beta: dict[str, str]) -> None:
    alpha, key = served.keys["alpha_admin"], served.keys["beta_admin"]
    for route in _id_routes():
        if route.method != "GET":
            _send(served, route, alpha, _values(route, beta))
    assert served.get(f"/datasets/{beta['dataset_id']}", key).status_code == 200
    assert served.get(f"/jobs/{beta['job_id']}", key).json()["state"] == "succeeded"
    assert served.get("/models/wine", key).json()["aliases"] == {"production": 1}
    r = served.get("/deployments/wine-live", key)
    assert r.status_code == 200 and r.json()["routes"][0]["version"] == 1


@pytest.mark.parametrize("path", ["/datasets", "/jobs", "/models", "/deployments", "/usage"])
def test_a_project_key_cannot_choose_another_project(served: Any, path: str) -> None:
    r = served.get(path, served.keys["alpha_admin"], project="beta")
    assert r.status_code in (403, 404), r.text
    assert "wine" not in r.text


def test_a_job_cannot_use_another_projects_dataset_or_model(served: Any) -> None:
    alpha = served.keys["alpha_train"]
    spec = served.spec(served.refs["beta"], name="stolen")
    r = served.submit(alpha, "train", spec)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "spec.data.source"
    nowhere = served.submit(alpha, "train", served.spec("dataset:ds_0123456789abcdef"))
    assert nowhere.json()["error"]["message"].replace("ds_0123456789abcdef", "X") == r.json()[
        "error"
    ]["message"].replace(served.refs["beta"].removeprefix("dataset:"), "X")
    for kind, body in [
        ("evaluate", {"model": "wine", "version": 1, "data": served.refs["alpha"]}),
        ("compress", {"source": "model:wine", "steps": [{"quantize": {}}]}),
    ]:
        r = served.submit(alpha, kind, body)
        assert r.status_code == 422, r.text
        assert (
            "wine" in r.json()["error"]["message"] and "not found" in r.json()["error"]["message"]
        )


def test_metrics_show_a_project_key_its_own_series_only(served: Any, beta: dict[str, str]) -> None:
    beta_key = served.keys["beta_admin"]
    row = {"inputs": [dict.fromkeys(WINE_FEATURES, 1.0)]}
    r = served.post(f"/deployments/{beta['deployment']}/predict", beta_key, row)
    assert r.status_code == 200, r.text
    everything = served.client.get("/metrics", headers=served.auth(served.admin)).text
    assert 'project="beta"' in everything  # the series exist
    for project in (None, "beta"):
        params = {"project": project} if project else {}
        r = served.client.get(
            "/metrics", headers=served.auth(served.keys["alpha_admin"]), params=params
        )
        assert r.status_code == 200, r.text
        leaked = [line for line in r.text.splitlines() if "beta" in line]
        assert leaked == [], leaked
