"""Inputs that used to reach a 500 answer a 4xx in the one error shape, naming the field.

Integers past what a database column holds, NUL characters and unpaired surrogates in
any text (PostgreSQL refuses NUL; no engine encodes a lone surrogate), and S3 imports
that cannot authenticate. Each probe runs against the real app in-process; the client
raises any server error as an exception, so a 500 fails the test loudly.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.conftest import API, Platform
from kiln.store.db import MAX_OFFSET
from support import free_port

HUGE = 2**63  # one past SQLite's and PostgreSQL's INTEGER: an OverflowError before


def paged_operations(platform: Platform) -> list[tuple[str, str]]:
    """Every GET in the OpenAPI document with an integer offset/limit/after parameter
    (the OpenAI routes' ``after`` is a string cursor, an object's id: not one of them)."""
    document = platform.client.get("/openapi.json").json()
    found = []
    for path, item in document["paths"].items():
        for parameter in item.get("get", {}).get("parameters", []):
            integer = parameter.get("schema", {}).get("type") == "integer"
            name = parameter["name"]
            paging = parameter["in"] == "query" and name in ("offset", "limit", "after")
            if paging and (integer or not path.startswith("/v1/")):
                found.append((path, parameter["name"]))
    return found


def concrete(path: str) -> str:
    return re.sub(r"{\w+}", "x", path)


def test_every_paged_api_route_refuses_integers_past_the_columns(platform: Platform) -> None:
    operations = paged_operations(platform)
    assert {("/api/v1/jobs", "offset"), ("/api/v1/jobs/{job_id}/logs", "after")} <= set(operations)
    assert len(operations) >= 10, operations  # audit, datasets, jobs, models, versions, ...
    with platform.client:  # the lifespan: deployment routes need the deployment manager
        for path, name in operations:
            for value in (HUGE, 10**30, MAX_OFFSET + 1):
                r = platform.client.get(
                    concrete(path), headers=platform.auth(platform.admin), params={name: value}
                )
                if path.startswith("/v1/"):  # OpenAI's shape: a 400 naming the param
                    assert r.status_code == 400, (path, name, value, r.text)
                    assert r.json()["error"]["param"] == name, (path, r.text)
                    continue
                assert r.status_code == 422, (path, name, value, r.text)
                assert r.json()["error"]["field"] == name, (path, r.text)


def test_the_largest_offset_is_answered_not_overflowed(platform: Platform) -> None:
    for path in ("/audit", "/datasets", "/jobs", "/models"):
        r = platform.get(path, platform.admin, offset=MAX_OFFSET, limit=500)
        assert r.status_code == 200, (path, r.text)
        assert r.json()["items"] == [] and r.json()["offset"] == MAX_OFFSET


def sign_in(platform: Platform) -> Any:
    """A dashboard session through the real login form (a plain client: pages answer
    errors as HTML pages, not the API's JSON shape)."""
    client = TestClient(platform.client.app)
    form = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]*)"', form.text)
    assert csrf is not None
    r = client.post(
        "/login",
        data={"csrf": csrf[1], "key": platform.admin, "next": "/jobs"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return client


@pytest.mark.parametrize("page", ["/jobs", "/models", "/datasets", "/audit"])
def test_dashboard_pages_refuse_offsets_past_the_columns(platform: Platform, page: str) -> None:
    client = sign_in(platform)
    assert client.get(page, params={"offset": MAX_OFFSET}).status_code == 200
    for value in (HUGE, 10**30):
        r = client.get(page, params={"offset": value})
        assert r.status_code == 422, (page, r.text)
        assert "Invalid request" in r.text and "offset" in r.text


def test_dashboard_job_poll_refuses_a_huge_after(platform: Platform) -> None:
    client = sign_in(platform)
    job = platform.queued(platform.admin, "train", platform.spec("sklearn:iris"))
    assert client.get(f"/jobs/{job}/live.json", params={"after": 0}).status_code == 200
    r = client.get(f"/jobs/{job}/live.json", params={"after": HUGE})
    assert r.status_code == 422 and r.json()["error"]["field"] == "after", r.text


def test_huge_version_numbers_are_not_found(platform: Platform) -> None:
    job = platform.queued(platform.admin, "train", platform.spec("sklearn:iris", epochs=1))
    platform.run_jobs()
    assert platform.get(f"/jobs/{job}", platform.admin).json()["state"] == "succeeded"
    for version in (str(HUGE), "9" * 5000, "²", "v" + str(HUGE)):
        r = platform.get(f"/models/iris/versions/{version}", platform.admin)
        assert r.status_code == 404, (version[:20], r.text)
        r = platform.put("/models/iris/aliases/prod", platform.admin, {"version": version})
        assert r.status_code == 404, (version[:20], r.text)
    r = platform.put("/models/iris/aliases/prod", platform.admin, {"version": HUGE})
    assert r.status_code == 404, r.text


# ---- NUL characters and unpaired surrogates ------------------------------------------


def refused(r: Any, field: str) -> None:
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field, r.text
    assert "NUL" in error["message"], r.text


def test_nul_in_path_parameters_is_refused_naming_them(platform: Platform) -> None:
    key = platform.admin
    refused(platform.get("/models/ir%00is", key), "name")
    refused(platform.get("/models/iris/versions/1%00", key), "version")
    refused(platform.get("/datasets/ds_%00", key), "dataset_id")
    refused(platform.get("/jobs/job_%00/logs", key), "job_id")
    refused(platform.delete("/models/iris/aliases/a%00", key), "alias")


def test_nul_in_query_parameters_is_refused_naming_them(platform: Platform) -> None:
    refused(platform.get("/jobs", platform.admin, project="default\x00"), "project")
    refused(platform.get("/usage", platform.admin, group_by="day\x00"), "group_by")
    r = platform.client.get(
        f"{API}/models?project=de%00fault", headers=platform.auth(platform.admin)
    )
    refused(r, "project")


def test_nul_and_lone_surrogates_in_json_bodies_are_refused_naming_the_field(
    platform: Platform,
) -> None:
    key = platform.admin
    refused(platform.post("/projects", key, {"name": "a\x00b"}), "name")
    refused(platform.post("/keys", key, {"scopes": ["read"], "name": "x\x00"}), "name")
    spec = platform.spec("sklearn:iris", name="iris\x00")
    refused(platform.post("/jobs", key, {"kind": "train", "spec": spec}), "spec.name")
    spec = platform.spec("sklearn:iris")
    spec["data"]["target"] = "tar\x00get"
    refused(platform.post("/jobs", key, {"kind": "train", "spec": spec}), "spec.data.target")
    # a lone surrogate: valid JSON, but text no database can encode
    raw = b'{"project": "default", "kind": "\\ud816x", "limit": null}'
    headers = {**platform.auth(key), "content-type": "application/json"}
    refused(platform.client.put(f"{API}/quotas", content=raw, headers=headers), "kind")
    # a pair of surrogates is one character (an emoji): not refused for that
    raw = b'{"name": "\\ud83d\\ude00"}'
    r = platform.client.post(f"{API}/projects", content=raw, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["field"] == "name", r.text
    assert "NUL" not in r.json()["error"]["message"]
    assert platform.post("/projects", key, {"name": "clean"}).status_code == 201


def test_a_json_body_without_a_content_type_is_guarded_too(platform: Platform) -> None:
    """FastAPI parses such a body as JSON, so it must not slip past the guard."""
    headers = platform.auth(platform.admin)
    for raw, field in [
        (b'{"name": "x", "uri": "/a\\u0000b"}', "uri"),
        (b'{"name": "x", "uri": "/a\\ud800b"}', "uri"),
    ]:
        r = platform.client.post(f"{API}/datasets/import", content=raw, headers=headers)
        refused(r, field)


def test_nul_in_form_fields_is_refused_naming_them(platform: Platform) -> None:
    r = platform.upload(platform.admin, b"x,y\n1,2\n", "t.csv", name="t\x00")
    assert r.status_code == 422 and r.json()["error"]["field"] == "name", r.text
    r = platform.upload(platform.admin, b"x,y\n1,2\n", "t\x00.csv")
    assert r.status_code == 422 and r.json()["error"]["field"] == "file", r.text
    # the dashboard's urlencoded sign-in form
    form = platform.client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]*)"', form.text)
    assert csrf is not None
    r = platform.client.post("/login", data={"csrf": csrf[1], "key": "kiln_\x00", "next": "/"})
    refused(r, "key")


def test_a_refused_request_stores_nothing(platform: Platform) -> None:
    from kiln.store.tables import Project

    before = platform.count(Project)
    refused(platform.post("/projects", platform.admin, {"name": "x\x00"}), "name")
    assert platform.count(Project) == before


def test_on_postgresql_nul_and_huge_offsets_never_reach_the_database(
    make_platform: Any, postgres_url: str
) -> None:
    """PostgreSQL refuses NUL in text and 2**63 as a BIGINT (a 500 each before)."""
    platform = make_platform(database_url=postgres_url)
    key = platform.admin
    refused(platform.get("/models/a%00b", key), "name")
    refused(platform.post("/projects", key, {"name": "a\x00b"}), "name")
    refused(platform.get("/datasets", key, project="default\x00"), "project")
    r = platform.get("/jobs", key, offset=HUGE)
    assert r.status_code == 422 and r.json()["error"]["field"] == "offset", r.text
    assert platform.get("/jobs", key, offset=MAX_OFFSET).status_code == 200
    assert platform.get("/models/ab/versions/" + str(HUGE), key).status_code == 404


@pytest.mark.parametrize(
    "source",
    ["~nosuchuser/model", "~nosuchuser\U0007f979", "/" + "a" * 300, "~/" + "b" * 300],
)
def test_base_model_sources_no_path_can_name_are_a_422(platform: Platform, source: str) -> None:
    """Found by the fuzzer: ``~user`` of no user made expanduser raise (a 500), as did a
    name past the file system's limit."""
    r = platform.post("/base-models", platform.admin, {"name": "m1", "source": source})
    assert r.status_code == 422 and r.json()["error"]["field"] == "source", r.text


# ---- S3 imports that cannot authenticate ---------------------------------------------


@pytest.fixture
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would hold old credentials


def test_s3_import_without_credentials_is_a_422_naming_the_uri(
    make_platform: Any, s3_bucket: Any, no_aws_credentials: None
) -> None:
    from servers import s3_client

    s3_client(s3_bucket.endpoint_url).put_object(
        Bucket=s3_bucket.name, Key="t.csv", Body=b"x,y\n1,2\n"
    )
    platform = make_platform(s3_endpoint_url=s3_bucket.endpoint_url)
    uri = f"s3://{s3_bucket.name}/t.csv"
    r = platform.post("/datasets/import", platform.admin, {"name": "t", "uri": uri})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "uri" and uri in r.json()["error"]["message"]
    assert "credentials" in r.json()["error"]["message"]


def test_s3_import_from_an_unreachable_endpoint_is_a_502_naming_the_uri(
    make_platform: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    port = free_port()  # nothing listens there
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    platform = make_platform(s3_endpoint_url=f"http://127.0.0.1:{port}")
    uri = "s3://bucket/t.csv"
    r = platform.post("/datasets/import", platform.admin, {"name": "t", "uri": uri})
    assert r.status_code in (422, 502), r.text
    assert r.json()["error"]["field"] == "uri" and uri in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("code", "status"),
    [("InvalidAccessKeyId", 422), ("SignatureDoesNotMatch", 422), ("InternalError", 502)],
)
def test_s3_errors_botocore_raises_map_to_4xx_or_502(code: str, status: int) -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    from kiln.store.datasets import s3_error

    uri = "s3://bucket/key.csv"
    refused_by_s3 = ClientError({"Error": {"Code": code, "Message": "no"}}, "GetObject")
    error = s3_error(uri, refused_by_s3)
    assert (error.http_status, error.field) == (status, "uri") and uri in error.message
    assert s3_error(uri, NoCredentialsError()).http_status == 422
    unreachable = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert s3_error(uri, unreachable).http_status == 502
    assert s3_error(uri, PermissionError("denied")).http_status == 422
