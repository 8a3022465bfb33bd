"""The API contract: pagination, the error shape, the audit log, the OpenAPI document."""

from __future__ import annotations

import pytest

from kiln.store.tables import AuditEvent

API = "/api/v1"


def _walk(platform, path: str, limit: int, **params) -> tuple[list[dict], list[dict]]:
    """Every item of a list, page by page; and the pages' envelopes."""
    items, pages, offset = [], [], 0
    while offset is not None:
        r = platform.get(path, platform.admin, limit=limit, offset=offset, **params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert set(page) == {"items", "total", "limit", "offset", "next_offset"}
        assert page["limit"] == limit and page["offset"] == offset
        pages.append(page)
        items.extend(page["items"])
        offset = page["next_offset"]
        assert len(pages) < 20
    return items, pages


def test_pagination_walks_every_list(platform) -> None:
    for i in range(5):
        platform.queued(platform.admin, "train", platform.spec("sklearn:iris", name=f"m{i}"))
    for i in range(3):
        assert platform.upload(platform.admin, b"a,b\n1,2\n", f"t{i}.csv").status_code == 201

    jobs, pages = _walk(platform, "/jobs", 2)
    assert [len(p["items"]) for p in pages] == [2, 2, 1]
    assert [p["next_offset"] for p in pages] == [2, 4, None]
    assert {p["total"] for p in pages} == {5}
    assert len({j["id"] for j in jobs}) == 5
    every = platform.get("/jobs", platform.admin).json()
    assert [j["id"] for j in jobs] == [j["id"] for j in every["items"]]  # a stable order
    assert every["next_offset"] is None and every["limit"] == 50

    datasets, pages = _walk(platform, "/datasets", 2)
    assert len({d["id"] for d in datasets}) == 3
    assert [p["next_offset"] for p in pages] == [2, None]

    # past the end: an empty page, the true total
    far = platform.get("/jobs", platform.admin, offset=10).json()
    assert far["items"] == [] and far["total"] == 5 and far["next_offset"] is None

    events, _ = _walk(platform, "/audit", 3)
    assert len(events) == platform.count(AuditEvent) == 8
    assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)


def test_pagination_of_versions(world) -> None:
    key = world.keys["alpha_read"]
    page = world.get("/models/iris/versions", key, limit=1).json()
    assert page["total"] == 2 and page["next_offset"] == 1
    assert page["items"][0]["version"] == 2
    page = world.get("/models/iris/versions", key, limit=1, offset=1).json()
    assert page["items"][0]["version"] == 1 and page["next_offset"] is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": "x"}, "offset"),
    ],
)
@pytest.mark.parametrize("path", ["/jobs", "/datasets", "/models", "/audit"])
def test_page_bounds_are_422(platform, path, params, field) -> None:
    r = platform.get(path, platform.admin, **params)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["field"] == field
    assert error["message"].startswith(f"{field}: ")


def test_page_bounds_themselves_are_accepted(platform) -> None:
    for limit in (1, 500):
        assert platform.get("/jobs", platform.admin, limit=limit).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/api/v1/nothing-here", 404, "not_found"),
        ("POST", "/api/v1/nothing-here", 404, "not_found"),
        ("GET", "/nothing", 404, "not_found"),
        ("GET", "/api/v2/jobs", 404, "not_found"),
        ("DELETE", "/api/v1/jobs", 405, "method_not_allowed"),
        ("PATCH", "/api/v1/models/iris", 405, "method_not_allowed"),
    ],
)
def test_routing_errors_have_the_error_shape(platform, method, path, status, code) -> None:
    r = platform.client.request(method, path, headers=platform.auth(platform.admin))
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["field"] is None


def test_malformed_bodies_have_the_error_shape(platform) -> None:
    headers = {**platform.auth(platform.admin), "Content-Type": "application/json"}
    for content in (b"{not json", b"", b"[]", b"null", b'{"kind": "train"'):
        r = platform.client.post(f"{API}/jobs", headers=headers, content=content)
        assert r.status_code == 422, (content, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
    r = platform.client.post(
        f"{API}/datasets", headers=platform.auth(platform.admin), data={"name": "x"}
    )
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "file"


def test_openapi_lists_the_routes(platform) -> None:
    r = platform.client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    expected = {
        "/api/v1/projects": {"get", "post"},
        "/api/v1/keys": {"get", "post"},
        "/api/v1/keys/{key_id}": {"delete"},
        "/api/v1/datasets": {"get", "post"},
        "/api/v1/datasets/import": {"post"},
        "/api/v1/datasets/{dataset_id}": {"get"},
        "/api/v1/jobs": {"get", "post"},
        "/api/v1/jobs/{job_id}": {"get"},
        "/api/v1/jobs/{job_id}/metrics": {"get"},
        "/api/v1/jobs/{job_id}/logs": {"get"},
        "/api/v1/jobs/{job_id}/cancel": {"post"},
        "/api/v1/models": {"get"},
        "/api/v1/models/{name}": {"get"},
        "/api/v1/models/{name}/versions": {"get"},
        "/api/v1/models/{name}/versions/{version}": {"get"},
        "/api/v1/models/{name}/versions/{version}/bundle": {"get"},
        "/api/v1/models/{name}/aliases/{alias}": {"put", "delete"},
        "/api/v1/audit": {"get"},
        "/healthz": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    assert r.json()["info"]["title"] == "kiln"


# -- the audit log ---------------------------------------------------------------------


def _events(platform, key: str | None = None) -> list[tuple]:
    items = platform.get("/audit", key or platform.admin, limit=500).json()["items"]
    return [(e["action"], e["outcome"], e["status"], e["key_id"]) for e in reversed(items)]


def test_every_mutating_call_is_audited_refused_ones_too(make_platform) -> None:
    p = make_platform(max_upload_mb=0.01)
    admin_id = p.admin.split("_")[1]
    read = p.create_key("default", ["read"])
    read_id = read.split("_")[1]
    base = _events(p)
    assert base == [("keys.create", "ok", 201, admin_id)]

    ref = p.dataset(p.admin, "iris")  # ok 201
    p.client.post(f"{API}/jobs", json={"kind": "train", "spec": {}})  # 401: no key
    p.client.post(f"{API}/jobs", headers={"Authorization": "Bearer kiln_nope"}, json={})  # 401
    p.submit(read, "train", p.spec(ref))  # 403
    p.submit(p.admin, "train", p.spec(ref, model={"type": "mlp", "hiden": [1]}))  # 422 spec
    p.post("/jobs", p.admin, {"kind": "train"})  # 422 body
    p.upload(p.admin, b"a,b\n" + b"1,2\n" * 5000, "big.csv")  # 413
    job = p.queued(p.admin, "train", p.spec(ref))  # ok
    p.post(f"/jobs/{job}/cancel", p.admin)  # ok
    p.post(f"/jobs/{job}/cancel", p.admin)  # 409
    p.put("/models/iris/aliases/prod", p.admin, {"version": 1})  # 404
    p.post("/projects", p.admin, {"name": "Bad Name"})  # 422
    p.delete(f"/keys/{read_id}", p.admin)  # ok
    # reads are not audited
    for path in ("/jobs", "/datasets", "/models", "/keys", f"/jobs/{job}"):
        p.get(path, p.admin)

    assert _events(p)[1:] == [
        ("datasets.upload", "ok", 201, admin_id),
        ("jobs.submit", "unauthorized", 401, None),
        ("jobs.submit", "unauthorized", 401, None),
        ("jobs.submit", "forbidden", 403, read_id),
        ("jobs.submit", "invalid_spec", 422, admin_id),
        ("jobs.submit", "invalid_request", 422, admin_id),
        ("datasets.upload", "too_large", 413, None),
        ("jobs.submit", "ok", 201, admin_id),
        ("jobs.cancel", "ok", 200, admin_id),
        ("jobs.cancel", "conflict", 409, admin_id),
        ("models.set_alias", "not_found", 404, admin_id),
        ("projects.create", "invalid_spec", 422, admin_id),
        ("keys.revoke", "ok", 200, admin_id),
    ]
    items = p.get("/audit", p.admin, limit=500).json()["items"]
    by_action = {(e["action"], e["outcome"]): e for e in items}
    assert by_action[("jobs.submit", "ok")]["target"] == f"job:{job}"
    assert by_action[("keys.revoke", "ok")]["target"] == f"key:{read_id}"
    assert by_action[("datasets.upload", "ok")]["target"] == ref
    assert set(items[0]) == {
        "id",
        "time",
        "key_id",
        "project_id",
        "action",
        "target",
        "outcome",
        "status",
    }


def test_audit_is_admin_only_and_per_project(world) -> None:
    assert world.get("/audit", world.keys["alpha_read"]).status_code == 403
    alpha = world.get("/audit", world.keys["alpha_admin"], limit=500).json()["items"]
    beta = world.get("/audit", world.keys["beta_admin"], limit=500).json()["items"]
    everything = world.get("/audit", world.admin, limit=500).json()["items"]
    assert alpha and beta
    assert len({e["project_id"] for e in alpha}) == 1
    assert len({e["project_id"] for e in beta}) == 1
    assert alpha[0]["project_id"] != beta[0]["project_id"]
    assert {e["id"] for e in alpha} | {e["id"] for e in beta} <= {e["id"] for e in everything}
    # beta's upload is in beta's log only
    beta_upload = f"dataset:{world.refs['beta'].removeprefix('dataset:')}"
    assert beta_upload in {e["target"] for e in beta}
    assert beta_upload not in {e["target"] for e in alpha}
    # the global admin's project-less events (creating projects) are in no project's log
    created = {e["id"] for e in everything if e["action"] == "projects.create" and e["key_id"]}
    admin_id = world.admin.split("_")[1]
    mine = {e["id"] for e in everything if e["key_id"] == admin_id and e["project_id"] is None}
    assert created & mine
    assert not mine & {e["id"] for e in alpha}
