"""The model registry over HTTP: models, versions, aliases and bundle download."""

from __future__ import annotations

import io
import tarfile

import pandas as pd
import pytest

import kiln


def test_models_list_and_get(world) -> None:
    key = world.keys["alpha_read"]
    listed = world.get("/models", key).json()
    assert [m["name"] for m in listed["items"]] == ["iris"]
    assert listed["total"] == 1
    model = world.get("/models/iris", key).json()
    assert model["name"] == "iris"
    assert model["latest_version"] == 2
    assert world.get("/models/nope", key).status_code == 404


def test_versions_by_number_latest_and_alias(world) -> None:
    key = world.keys["alpha_read"]
    versions = world.get("/models/iris/versions", key).json()
    assert versions["total"] == 2
    assert [v["version"] for v in versions["items"]] == [2, 1]  # newest first
    v1 = world.get("/models/iris/versions/1", key).json()
    assert v1["model"] == "iris"
    assert v1["version"] == 1
    assert v1["task"] == "classification"
    assert v1["summary"]["model"] == "mlp"
    assert v1["size_bytes"] > 0
    assert "accuracy" in v1["metrics"]["test"]
    assert world.get("/models/iris/versions/v1", key).json()["id"] == v1["id"]
    assert world.get("/models/iris/versions/latest", key).json()["version"] == 2
    for missing in ("3", "0", "v9", "no-alias"):
        r = world.get(f"/models/iris/versions/{missing}", key)
        assert r.status_code == 404, missing
        assert r.json()["error"]["field"] == "version"


def test_alias_set_move_resolve_and_delete(world) -> None:
    deploy, read = world.keys["alpha_deploy"], world.keys["alpha_read"]
    r = world.put("/models/iris/aliases/staging", deploy, {"version": 1})
    assert r.status_code == 200, r.text
    assert r.json()["aliases"]["staging"] == 1
    assert world.get("/models/iris/versions/staging", read).json()["version"] == 1
    assert "staging" in world.get("/models/iris/versions/1", read).json()["aliases"]

    r = world.put("/models/iris/aliases/staging", deploy, {"version": "latest"})
    assert r.json()["aliases"]["staging"] == 2
    assert world.get("/models/iris/versions/staging", read).json()["version"] == 2
    assert "staging" not in world.get("/models/iris/versions/1", read).json()["aliases"]

    # an alias may be pointed at by another alias's version
    r = world.put("/models/iris/aliases/canary", deploy, {"version": "staging"})
    assert r.json()["aliases"]["canary"] == 2

    r = world.delete("/models/iris/aliases/staging", deploy)
    assert r.status_code == 200
    assert "staging" not in r.json()["aliases"]
    assert world.get("/models/iris/versions/staging", read).status_code == 404
    r = world.delete("/models/iris/aliases/staging", deploy)
    assert r.status_code == 404
    assert r.json()["error"]["field"] == "alias"
    assert world.delete("/models/iris/aliases/canary", deploy).status_code == 200


@pytest.mark.parametrize(
    "alias", ["Prod", "a.b", "-x", "_x", "x" * 65, "latest", "7", "v2", "x%25y", "%2e%2e", "a b"]
)
def test_invalid_alias_names_are_422(world, alias) -> None:
    deploy = world.keys["alpha_deploy"]
    r = world.put(f"/models/iris/aliases/{alias}", deploy, {"version": 1})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "alias"
    assert alias not in world.get("/models/iris", deploy).json()["aliases"]


def test_alias_to_a_missing_version_changes_nothing(world) -> None:
    deploy = world.keys["alpha_deploy"]
    r = world.put("/models/iris/aliases/ghost", deploy, {"version": 9})
    assert r.status_code == 404
    assert r.json()["error"]["field"] == "version"
    r = world.put("/models/iris/aliases/ghost", deploy, {"version": 1, "extra": True})
    assert r.status_code == 422
    assert "ghost" not in world.get("/models/iris", deploy).json()["aliases"]


def test_bundle_download_extracts_to_a_loadable_bundle(world, tmp_path) -> None:
    r = world.get("/models/iris/versions/1/bundle", world.keys["alpha_read"])
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/gzip"
    assert "iris-v1.tar.gz" in r.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        members = tar.getmembers()
        assert members
        for m in members:
            assert m.name == "iris-v1" or m.name.startswith("iris-v1/"), m.name
            assert m.isfile() or m.isdir(), m.name  # no links, devices, fifos
        assert "iris-v1/kiln.json" in tar.getnames()
        tar.extractall(tmp_path, filter="data")
    bundle = kiln.load(str(tmp_path / "iris-v1"))
    assert bundle.name == "iris"
    rows = pd.read_csv(io.BytesIO(world.csv("iris"))).head(5)
    out = bundle.predict(rows)
    assert len(out.predictions) == 5
    assert set(out.predictions) <= {0, 1, 2}
    # the bundle is the one the registry holds: the same test metrics
    v1 = world.get("/models/iris/versions/1", world.keys["alpha_read"]).json()
    assert bundle.metrics["test"]["accuracy"] == pytest.approx(v1["metrics"]["test"]["accuracy"])


def test_bundle_by_alias(world) -> None:
    r = world.get("/models/wine/versions/production/bundle", world.keys["beta_admin"])
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        assert {n.split("/")[0] for n in tar.getnames()} == {"wine-v1"}
