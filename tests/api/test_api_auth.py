"""Authentication (401), scopes (403) and the lifecycle of API keys."""

from __future__ import annotations

import hashlib
import secrets

import pytest
from sqlalchemy import text

from kiln.store.tables import ApiKey, Dataset, Job

API = "/api/v1"
SPEC = {
    "name": "iris",
    "task": "classification",
    "data": {"source": "sklearn:iris", "target": "target"},
    "model": {"type": "mlp", "hidden": [8]},
    "train": {"epochs": 2, "device": "cpu"},
}


def _split(key: str) -> tuple[str, str]:
    _, key_id, secret = key.split("_", 2)
    return key_id, secret


def _bad_headers(platform) -> dict[str, dict[str, str]]:
    """Every way to present a wrong key, by what is wrong with it."""
    good = platform.create_key("default", ["read", "train"])
    revoked = platform.create_key("default", ["read", "train"])
    key_id, _ = _split(revoked)
    assert platform.delete(f"/keys/{key_id}", platform.admin).status_code == 200
    good_id, good_secret = _split(good)
    other_secret = secrets.token_urlsafe(32)
    return {
        "missing": {},
        "empty": {"Authorization": ""},
        "wrong scheme": {"Authorization": f"Basic {good}"},
        "no token": {"Authorization": "Bearer "},
        "token without scheme": {"Authorization": good},
        "malformed": {"Authorization": "Bearer not-a-kiln-key"},
        "truncated": {"Authorization": f"Bearer {good[:-1]}"},
        "extra character": {"Authorization": f"Bearer {good}x"},
        "unknown id": {"Authorization": f"Bearer kiln_{secrets.token_hex(8)}_{good_secret}"},
        "right id, wrong secret": {"Authorization": f"Bearer kiln_{good_id}_{other_secret}"},
        "revoked": {"Authorization": f"Bearer {revoked}"},
    }


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/datasets", None),
        ("GET", "/models/iris", None),
        ("POST", "/jobs", {"kind": "train", "spec": SPEC}),
        ("GET", "/audit", None),
    ],
)
def test_every_bad_key_gets_the_same_401(platform, method, path, body) -> None:
    answers = {}
    for what, headers in _bad_headers(platform).items():
        r = platform.client.request(method, API + path, headers=headers, json=body)
        assert r.status_code == 401, (what, r.text)
        answers[what] = r.json()
    # one message whatever was wrong: nothing tells an unknown id from a wrong secret
    assert {str(a) for a in answers.values()} == {
        str(
            {
                "error": {
                    "code": "unauthorized",
                    "message": "invalid or missing API key",
                    "field": None,
                }
            }
        )
    }
    assert platform.count(Job) == 0


def test_authentication_comes_before_validation(platform) -> None:
    # an anonymous caller learns nothing about what a valid body would be
    r = platform.client.post(f"{API}/jobs", json={"kind": "nonsense", "spec": 3})
    assert r.status_code == 401
    r = platform.client.put(f"{API}/models/iris/aliases/prod", json={"bogus": 1})
    assert r.status_code == 401


def test_healthz_needs_no_key(platform) -> None:
    r = platform.client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_read_key_cannot_write(platform) -> None:
    read = platform.create_key("default", ["read"])
    r = platform.upload(read, platform.csv("iris"))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    assert r.json()["error"]["field"] == "scopes"
    assert "train" in r.json()["error"]["message"]
    r = platform.submit(read, "train", SPEC)
    assert r.status_code == 403
    r = platform.post("/datasets/import", read, {"name": "x", "uri": "s3://b/x.csv"})
    assert r.status_code == 403
    r = platform.post("/jobs/job_0123456789abcdef/cancel", read)
    assert r.status_code == 403
    assert platform.count(Dataset) == 0
    assert platform.count(Job) == 0
    assert platform.artifact_files() == {}
    # but it reads
    assert platform.get("/datasets", read).status_code == 200
    assert platform.get("/jobs", read).status_code == 200


def test_train_key_cannot_deploy(world) -> None:
    train = world.keys["alpha_train"]
    r = world.put("/models/iris/aliases/sneaky", train, {"version": 1})
    assert r.status_code == 403
    assert "deploy" in r.json()["error"]["message"]
    r = world.delete("/models/iris/aliases/sneaky", train)
    assert r.status_code == 403
    # the 403 does not depend on the model existing (no probing of names)
    r = world.put("/models/nope/aliases/sneaky", train, {"version": 1})
    assert r.status_code == 403
    assert "sneaky" not in world.get("/models/iris", train).json()["aliases"]


def test_deploy_key_cannot_train(world) -> None:
    r = world.submit(world.keys["alpha_deploy"], "train", SPEC)
    assert r.status_code == 403


def test_predict_key_cannot_read_the_registry(platform) -> None:
    predict = platform.create_key("default", ["predict"])
    for path in ("/datasets", "/jobs", "/models", "/models/iris/versions/1/bundle"):
        r = platform.get(path, predict)
        assert r.status_code == 403, path
        assert "read" in r.json()["error"]["message"]


@pytest.mark.parametrize("key", ["alpha_read", "alpha_train", "alpha_deploy"])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/audit", None),
        ("GET", "/keys", None),
        ("POST", "/keys", {"scopes": ["read"]}),
        ("DELETE", "/keys/0123456789abcdef", None),
        ("GET", "/projects", None),
        ("POST", "/projects", {"name": "mine"}),
    ],
)
def test_non_admin_keys_cannot_administer(world, key, method, path, body) -> None:
    r = world.client.request(method, API + path, headers=world.auth(world.keys[key]), json=body)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "forbidden"


def test_project_admin_cannot_create_projects(world) -> None:
    r = world.post("/projects", world.keys["alpha_admin"], {"name": "gamma"})
    assert r.status_code == 403
    assert r.json()["error"]["field"] == "scopes"
    names = [p["name"] for p in world.get("/projects", world.admin).json()]
    assert "gamma" not in names
    # it sees its own project only
    mine = world.get("/projects", world.keys["alpha_admin"]).json()
    assert [p["name"] for p in mine] == ["alpha"]


def test_project_admin_keys_stay_in_its_project(world) -> None:
    admin = world.keys["alpha_admin"]
    r = world.post("/keys", admin, {"project": "beta", "scopes": ["read"]})
    assert r.status_code == 404
    assert r.json()["error"]["field"] == "project"
    # no project named: a key of its own project, never a global one
    r = world.post("/keys", admin, {"scopes": ["read"], "name": "ci"})
    assert r.status_code == 201, r.text
    assert r.json()["project"] == "alpha"
    new = r.json()["key"]
    assert world.get("/datasets", new).status_code == 200
    assert world.get("/datasets", new, project="beta").status_code == 404
    listed = world.get("/keys", admin).json()
    assert {k["project"] for k in listed} == {"alpha"}


def test_project_admin_cannot_revoke_another_projects_key(world) -> None:
    beta_key = world.create_key("beta", ["read"])
    beta_id, _ = _split(beta_key)
    r = world.delete(f"/keys/{beta_id}", world.keys["alpha_admin"])
    assert r.status_code == 404  # as if it did not exist
    assert world.get("/datasets", beta_key).status_code == 200
    # the global admin's key is not the project admin's either
    admin_id, _ = _split(world.admin)
    assert world.delete(f"/keys/{admin_id}", world.keys["alpha_admin"]).status_code == 404
    assert world.get("/projects", world.admin).status_code == 200


def test_project_names_are_checked_and_unique(platform) -> None:
    platform.create_project("team")
    r = platform.post("/projects", platform.admin, {"name": "team"})
    assert r.status_code == 409
    assert r.json()["error"]["field"] == "name"
    for bad in ("../x", "Team", "a/b", "", "-x", "x" * 65):
        r = platform.post("/projects", platform.admin, {"name": bad})
        assert r.status_code == 422, bad
        assert r.json()["error"]["field"] == "name"
    names = [p["name"] for p in platform.get("/projects", platform.admin).json()]
    assert names == ["default", "team"]


def test_unknown_scope_is_refused(platform) -> None:
    for scopes in (["read", "root"], []):
        r = platform.post("/keys", platform.admin, {"project": "default", "scopes": scopes})
        assert r.status_code == 422
        assert r.json()["error"]["field"] == "scopes"
    assert platform.count(ApiKey) == 1


def test_key_lifecycle(platform) -> None:
    platform.create_project("team")
    r = platform.post(
        "/keys", platform.admin, {"project": "team", "scopes": ["read", "train"], "name": "ci"}
    )
    assert r.status_code == 201
    out = r.json()
    key = out["key"]
    key_id, secret = _split(key)
    assert out["id"] == key_id
    assert out["project"] == "team"
    assert out["scopes"] == ["read", "train"]
    assert out["revoked_at"] is None

    # it works, on its project
    assert platform.get("/datasets", key).status_code == 200
    assert platform.get("/datasets", key, project="team").status_code == 200

    # the secret is never shown again
    listed = platform.get("/keys", platform.admin)
    assert listed.status_code == 200
    entry = next(k for k in listed.json() if k["id"] == key_id)
    assert "key" not in entry
    assert not any("secret" in field for field in entry)
    assert secret not in listed.text

    # only a hash of it is stored
    with platform.svc.db.session() as s:
        columns = dict(
            s.execute(text("SELECT * FROM api_keys WHERE id = :id"), {"id": key_id})
            .mappings()
            .one()
        )
    assert all(secret not in str(value) for value in columns.values())
    assert columns["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    home = platform.settings.home_dir
    for path in home.glob("kiln.db*"):
        assert secret.encode() not in path.read_bytes()

    # revoked: refused from then on, and listed as revoked
    r = platform.delete(f"/keys/{key_id}", platform.admin)
    assert r.status_code == 200
    assert r.json()["revoked_at"] is not None
    assert "key" not in r.json()
    r = platform.get("/datasets", key)
    assert r.status_code == 401
    entry = next(k for k in platform.get("/keys", platform.admin).json() if k["id"] == key_id)
    assert entry["revoked_at"] is not None


def test_revoking_an_unknown_key_is_404(platform) -> None:
    r = platform.delete("/keys/0123456789abcdef", platform.admin)
    assert r.status_code == 404
    assert r.json()["error"]["field"] == "key_id"


def test_global_admin_creates_global_keys(platform) -> None:
    r = platform.post("/keys", platform.admin, {"scopes": ["admin"]})
    assert r.status_code == 201
    assert r.json()["project"] is None
    other = r.json()["key"]
    platform.create_project("p2")
    assert platform.get("/datasets", other, project="p2").status_code == 200
    r = platform.post("/projects", other, {"name": "p3"})
    assert r.status_code == 201


def test_keys_without_admin_must_belong_to_a_project(platform) -> None:
    # a key with no project acts on every project; only an admin key may be global
    r = platform.post("/keys", platform.admin, {"scopes": ["read"]})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "project"
    r = platform.post("/keys", platform.admin, {"scopes": ["read"], "project": "default"})
    assert r.status_code == 201 and r.json()["project"] == "default"
