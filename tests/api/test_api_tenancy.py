"""Tenant isolation: a project's key neither sees nor touches another project's things."""

from __future__ import annotations

import pytest


def _ids(world, key: str, path: str, **params) -> set[str]:
    r = world.get(path, key, limit=500, **params)
    assert r.status_code == 200, r.text
    return {item.get("id") or item["name"] for item in r.json()["items"]}


def _beta(world) -> dict[str, str]:
    dataset_id = world.refs["beta"].removeprefix("dataset:")
    job_id = world.jobs["beta_train"]
    return {
        "dataset": f"/datasets/{dataset_id}",
        "job": f"/jobs/{job_id}",
        "job metrics": f"/jobs/{job_id}/metrics",
        "job logs": f"/jobs/{job_id}/logs",
        "model": "/models/wine",
        "versions": "/models/wine/versions",
        "version": "/models/wine/versions/1",
        "latest": "/models/wine/versions/latest",
        "alias": "/models/wine/versions/production",
        "bundle": "/models/wine/versions/1/bundle",
    }


@pytest.mark.parametrize("project", [None, "beta"])
@pytest.mark.parametrize("key", ["alpha_admin", "alpha_read"])
def test_another_projects_resources_are_not_found(world, key, project) -> None:
    params = {"project": project} if project else {}
    for what, path in _beta(world).items():
        r = world.get(path, world.keys[key], **params)
        assert r.status_code == 404, (what, r.text)
        assert r.json()["error"]["code"] == "not_found"


def test_foreign_ids_answer_exactly_like_missing_ones(world) -> None:
    key = world.keys["alpha_admin"]
    beta_ds = world.refs["beta"].removeprefix("dataset:")
    beta_job = world.jobs["beta_train"]
    for foreign, missing in [
        (beta_ds, "ds_0000000000000000"),
        (beta_job, "job_0000000000000000"),
        ("wine", "nosuchmodel"),
    ]:
        kind = {"d": "datasets", "j": "jobs", "w": "models"}[foreign[0]]
        a = world.get(f"/{kind}/{foreign}", key)
        b = world.get(f"/{kind}/{missing}", key)
        assert a.status_code == b.status_code == 404
        assert a.json()["error"]["field"] == b.json()["error"]["field"]
        assert a.json()["error"]["message"].replace(foreign, "?") == b.json()["error"][
            "message"
        ].replace(missing, "?")


def test_another_projects_resources_cannot_be_changed(world) -> None:
    alpha = world.keys["alpha_admin"]
    job_id = world.jobs["beta_train"]
    # a finished job of our own would answer 409; beta's answers 404 (no existence leak)
    r = world.post(f"/jobs/{job_id}/cancel", alpha)
    assert r.status_code == 404
    r = world.put("/models/wine/aliases/hijack", alpha, {"version": 1})
    assert r.status_code == 404
    r = world.delete("/models/wine/aliases/production", alpha)
    assert r.status_code == 404
    r = world.put("/models/wine/aliases/hijack", alpha, {"version": 1}, project="beta")
    assert r.status_code == 404
    beta = world.get("/models/wine", world.keys["beta_admin"]).json()
    assert beta["aliases"] == {"production": 1}


def test_another_projects_dataset_and_model_cannot_be_used_in_a_job(world) -> None:
    alpha = world.keys["alpha_train"]
    r = world.submit(alpha, "train", world.spec(world.refs["beta"], name="stolen"))
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "spec.data.source"
    r = world.submit(alpha, "evaluate", {"model": "wine", "data": world.refs["alpha"]})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "spec.model"
    r = world.submit(alpha, "evaluate", {"model": "iris", "data": world.refs["beta"]})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "spec.data"
    r = world.submit(alpha, "train", world.spec(world.refs["alpha"]), project="beta")
    assert r.status_code == 404


def test_lists_show_only_own_resources(world) -> None:
    alpha, beta = world.keys["alpha_read"], world.keys["beta_admin"]
    alpha_ds = world.refs["alpha"].removeprefix("dataset:")
    beta_ds = world.refs["beta"].removeprefix("dataset:")
    assert alpha_ds in _ids(world, alpha, "/datasets")
    assert beta_ds not in _ids(world, alpha, "/datasets")
    assert _ids(world, beta, "/datasets") == {beta_ds}

    alpha_jobs = {world.jobs[j] for j in ("train1", "train2", "crossval", "evaluate")}
    assert alpha_jobs <= _ids(world, alpha, "/jobs")
    assert world.jobs["beta_train"] not in _ids(world, alpha, "/jobs")
    assert world.jobs["beta_train"] in _ids(world, beta, "/jobs")

    assert "wine" not in _ids(world, alpha, "/models")
    assert "iris" in _ids(world, alpha, "/models")
    assert _ids(world, beta, "/models") == {"wine"}


def test_global_admin_chooses_the_project(world) -> None:
    admin = world.admin
    beta_ds = world.refs["beta"].removeprefix("dataset:")
    # default project: nothing of alpha's or beta's
    assert _ids(world, admin, "/datasets") == set()
    assert _ids(world, admin, "/datasets", project="beta") == {beta_ds}
    assert world.get(f"/datasets/{beta_ds}", admin).status_code == 404
    assert world.get(f"/datasets/{beta_ds}", admin, project="beta").status_code == 200
    r = world.get("/models/wine/versions/production", admin, project="beta")
    assert r.status_code == 200
    assert r.json()["version"] == 1
    r = world.get("/jobs", admin, project="nowhere")
    assert r.status_code == 404
    assert r.json()["error"]["field"] == "project"


def test_own_project_may_be_named(world) -> None:
    r = world.get("/datasets", world.keys["alpha_read"], project="alpha")
    assert r.status_code == 200
