"""The OpenAPI document says what the server does, and its docs pages work offline.

Security scheme, declared statuses with the error body, name patterns, the media type of
/metrics; 405s with ``Allow``; /docs and /redoc whose assets come from the same server.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.conftest import API, Platform
from kiln.api.openapi import PUBLIC
from kiln.api.schemas import NAME_PATTERN, SEGMENT_PATTERN, ErrorOut

METHODS = {"get", "put", "post", "patch", "delete"}


@pytest.fixture
def document(platform: Platform) -> dict[str, Any]:
    r = platform.client.get("/openapi.json")
    assert r.status_code == 200
    doc: dict[str, Any] = r.json()
    return doc


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def test_every_route_but_health_declares_the_bearer_scheme(document: dict[str, Any]) -> None:
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    ops = operations(document)
    assert len(ops) > 30
    for method, path, operation in ops:
        if path in PUBLIC:
            assert "security" not in operation, path
        else:
            assert operation["security"] == [{"bearer": []}], (method, path)
    assert {"/healthz", "/readyz"} <= PUBLIC


def test_what_the_document_calls_public_needs_no_key_and_the_rest_does(
    platform: Platform, document: dict[str, Any]
) -> None:
    # a plain client: the v2 routes answer their protocol's error shape, not kiln's
    client = TestClient(platform.client.app)
    with client:  # the lifespan: inference routes need the deployment manager
        for method, path, _ in operations(document):
            url = re.sub(r"{\w+}", "x", path)
            r = client.request(method.upper(), url)
            if path in PUBLIC:
                assert r.status_code in (200, 503), (method, path, r.text)
            else:
                assert r.status_code == 401, (method, path, r.text)


def _check_openai_errors(method: str, path: str, operation: dict[str, Any]) -> None:
    """An invalid request is OpenAI's 400 (no 422), each error in OpenAI's body."""
    responses = operation["responses"]
    assert {"400", "401", "403", "404", "429"} <= set(responses), (method, path)
    assert "422" not in responses, (method, path)
    if path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        assert "503" in responses, (method, path)
    for code, response in responses.items():
        if code.startswith(("4", "5")):
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/OpenAIErrorOut"}, (method, path, code)


def test_error_statuses_are_declared_with_the_error_body(document: dict[str, Any]) -> None:
    error_ref = {"$ref": "#/components/schemas/ErrorOut"}
    assert document["components"]["schemas"]["ErrorOut"]["required"] == ["error"]
    assert "HTTPValidationError" not in document["components"]["schemas"]
    seen: set[str] = set()
    for method, path, operation in operations(document):
        responses = operation["responses"]
        if path in PUBLIC:
            continue
        if path.startswith("/v1/"):  # the OpenAI-compatible routes: OpenAI's errors
            _check_openai_errors(method, path, operation)
            continue
        for code in ("401", "403", "404", "422", "429"):
            assert code in responses, (method, path, code)
        if "requestBody" in operation:
            assert {"400", "413"} <= set(responses), (method, path)
        if method != "get":
            assert "409" in responses, (method, path)
        if path.startswith(("/api/v1/deployments", "/v2/")):
            assert "503" in responses, (method, path)
        for code, response in responses.items():
            if code.startswith(("4", "5")):
                schema = response["content"]["application/json"]["schema"]
                if path.startswith("/v2/"):
                    assert schema == {"$ref": "#/components/schemas/V2ErrorOut"}
                else:
                    assert schema == error_ref, (method, path, code)
                seen.add(code)
    assert {"400", "401", "403", "404", "409", "413", "422", "429", "503"} <= seen
    assert "Retry-After" in document["paths"]["/api/v1/jobs"]["get"]["responses"]["429"]["headers"]
    assert "503" in document["paths"]["/readyz"]["get"]["responses"]
    assert "502" in document["paths"]["/api/v1/datasets/import"]["post"]["responses"]


def test_errors_the_server_answers_fit_the_declared_body(platform: Platform) -> None:
    key = platform.admin
    answers = [
        platform.get("/models/nope", key),  # 404
        platform.get("/jobs", key, limit=0),  # 422
        platform.get("/jobs", "kiln_0000000000000000_" + "A" * 43),  # 401
        platform.post("/projects", key, {"name": "default"}),  # 409
        platform.client.post(
            f"{API}/jobs",
            content=b"\xff\xfe{",  # not UTF-8: FastAPI cannot even decode it
            headers={**platform.auth(key), "content-type": "application/json"},
        ),  # 400
    ]
    assert [r.status_code for r in answers] == [404, 422, 401, 409, 400]
    for r in answers:
        ErrorOut.model_validate(r.json())
    assert answers[-1].json()["error"]["field"] == "body"


def test_names_in_paths_and_bodies_carry_their_patterns(document: dict[str, Any]) -> None:
    def param(path: str, method: str, name: str) -> dict[str, Any]:
        found = [p for p in document["paths"][path][method]["parameters"] if p["name"] == name]
        assert found, (path, name)
        schema: dict[str, Any] = found[0]["schema"]
        return schema

    assert param("/api/v1/models/{name}", "get", "name")["pattern"] == NAME_PATTERN
    assert param("/api/v1/deployments/{name}", "get", "name")["pattern"] == NAME_PATTERN
    assert param("/api/v1/models/{name}/aliases/{alias}", "put", "alias")["pattern"] == NAME_PATTERN
    assert param("/api/v1/jobs/{job_id}", "get", "job_id")["pattern"] == "^job_[0-9a-f]{16}$"
    schemas = document["components"]["schemas"]
    assert schemas["ProjectIn"]["properties"]["name"]["pattern"] == NAME_PATTERN
    assert schemas["DeploymentIn"]["properties"]["name"]["pattern"] == NAME_PATTERN
    assert schemas["DeploymentIn"]["properties"]["model"]["pattern"] == NAME_PATTERN
    assert schemas["DatasetImport"]["properties"]["name"]["pattern"] == SEGMENT_PATTERN
    form = document["paths"]["/api/v1/datasets"]["post"]["requestBody"]["content"]
    ref = form["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert schemas[ref]["properties"]["name"]["anyOf"][0]["pattern"] == SEGMENT_PATTERN
    assert schemas["KeyIn"]["properties"]["scopes"]["items"]["enum"] == [
        "admin",
        "read",
        "train",
        "deploy",
        "predict",
    ]
    # free text carries the no-NUL pattern: the server refuses NUL everywhere
    assert schemas["KeyIn"]["properties"]["name"]["pattern"] == "^[^\\u0000]*$"


def test_the_patterns_are_the_ones_the_store_enforces() -> None:
    from kiln.store.artifacts import _SEGMENT
    from kiln.store.projects import NAME

    assert NAME.pattern == NAME_PATTERN
    assert f"^{_SEGMENT.pattern}$" == SEGMENT_PATTERN


def test_ids_in_paths_match_what_the_server_makes(platform: Platform) -> None:
    document = platform.client.get("/openapi.json").json()
    job = platform.queued(platform.admin, "train", platform.spec("sklearn:iris"))
    dataset = platform.dataset(platform.admin).removeprefix("dataset:")
    key_id = platform.get("/keys", platform.admin).json()[0]["id"]
    patterns = {
        p["name"]: p["schema"]["pattern"]
        for item in document["paths"].values()
        for operation in item.values()
        for p in operation.get("parameters", [])
        if p["in"] == "path" and "pattern" in p["schema"]
    }
    assert re.fullmatch(patterns["job_id"], job)
    assert re.fullmatch(patterns["dataset_id"], dataset)
    assert re.fullmatch(patterns["key_id"], key_id)
    for version in ("3", "v3", "latest", "production"):
        assert re.fullmatch(patterns["version"], version)


def test_metrics_is_documented_and_served_as_text(
    platform: Platform, document: dict[str, Any]
) -> None:
    content = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/plain"]
    with platform.client:  # the lifespan: /metrics needs the deployment manager
        r = platform.client.get("/metrics", headers=platform.auth(platform.admin))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("TRACE", "/api/v1/deployments/x", "GET, PATCH, DELETE"),
        ("PUT", "/api/v1/jobs", "GET, POST"),
        ("GET", "/api/v1/datasets/import", "POST"),
        ("DELETE", "/healthz", "GET"),
        ("PUT", "/jobs", "GET"),  # a dashboard page: not in the document
    ],
)
def test_405_names_the_allowed_methods(
    platform: Platform, method: str, path: str, allow: str
) -> None:
    if (method, path) == ("GET", "/api/v1/datasets/import"):
        # GET reaches /datasets/{dataset_id} (a dataset named "import": 404), so probe
        # the documented path with a method no route of it takes
        method = "PATCH"
    r = platform.client.request(method, path, headers=platform.auth(platform.admin))
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == allow
    assert r.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_same_server(platform: Platform, page: str) -> None:
    r = platform.client.get(page)
    assert r.status_code == 200
    html = r.text
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
    assets = [u for u in urls if not u.startswith("#")]
    assert assets, html
    for url in assets:
        assert not re.match(r"(https?:)?//", url), f"{page} loads {url} from elsewhere"
        got = platform.client.get(url)
        assert got.status_code == 200, url
        assert len(got.content) > 100, url
    assert "/openapi.json" in assets
    scripts = [u for u in assets if u.endswith(".js")]
    assert scripts, assets
