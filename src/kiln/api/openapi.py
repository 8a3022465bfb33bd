"""The OpenAPI document kiln serves: FastAPI's, amended to say what the routes really do.

FastAPI documents a 200 and a 422 of its own shape. :func:`install` replaces that with:

- the bearer scheme (``Authorization: Bearer <API key>``) on every route but health;
- every error status a route can answer, each with the one error body (:class:`ErrorOut`;
  the KServe v2 routes use their protocol's ``{"error": "..."}``, :class:`V2ErrorOut`, and
  the OpenAI-compatible routes under ``/v1`` OpenAI's ``{"error": {"message", "type",
  "param", "code"}}``, where an invalid request is a 400, as OpenAI answers it);
- the patterns that names, ids and versions in paths must match (what ``check_name``,
  ``safe_segment`` and the id formats enforce; others are refused as not found), and
  the dataset upload form's ``name``;
- that no text may hold a NUL (``kiln.api.guards`` refuses it), as a pattern on strings
  and on the keys of free-form objects;
- ``text/plain`` for ``/metrics``.

The fuzzer in CI (``make fuzz``) holds the server to this document.
"""

from __future__ import annotations

from collections.abc import Container

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import JsonValue

from kiln.api.schemas import NAME_PATTERN, SEGMENT_PATTERN, ErrorOut, V2ErrorOut
from kiln.monitor.usage import PERIODS
from kiln.serve.openai_schemas import ErrorBody as OpenAIErrorOut

SCHEME = "bearer"
PUBLIC = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
"""Paths that need no key (everything else answers 401 without one)."""

NO_NUL = "^[^\\u0000]*$"
"""A string with no NUL: PostgreSQL cannot store one, so every route refuses it (422)."""

_PATH_PATTERNS = {
    "name": NAME_PATTERN,
    "alias": NAME_PATTERN,
    "version": NAME_PATTERN,  # 3, v3, latest or an alias: all of the name alphabet
    "dataset_id": "^ds_[0-9a-f]{16}$",
    "job_id": "^job_[0-9a-f]{16}$",
    "key_id": "^[0-9a-f]{16}$",
}
"""Path parameters of the registry, deployments and v2 routes, by name."""
_PATTERNED = (
    "/api/v1/models",
    "/api/v1/deployments",
    "/api/v1/datasets",
    "/api/v1/jobs",
    "/api/v1/keys",
    "/v2/models",
)

_DESCRIPTIONS = {
    400: "The body is not what its content type says (not JSON, a broken form).",
    401: "No API key, or an unknown or revoked one.",
    403: "The key lacks the scope, or the project, this needs.",
    404: "No such resource in the key's project (or no such project).",
    409: "Clashes with what is stored (a name taken, a job already finished).",
    413: "The body is over the size limit (KILN_MAX_UPLOAD_MB for uploads, else 8 MiB).",
    422: "A parameter or body field is invalid; `field` names it.",
    429: "A quota or rate limit is spent; `Retry-After` says when to come back.",
    502: "A service behind kiln (S3) failed or refused.",
    503: "The deployment is not ready, or its queue is full; retry shortly.",
    504: "The request waited past the deployment's timeout_ms.",
}
_EXTRA: dict[tuple[str, str], set[int]] = {
    ("post", "/api/v1/datasets/import"): {502},
    ("post", "/api/v1/deployments/{name}/predict"): {503, 504},
    ("post", "/v2/models/{name}/infer"): {503, 504},
}
_MUTATING = {"post", "put", "patch", "delete"}
OPENAI = "/v1/"
OPENAI_ERROR = "OpenAIErrorOut"
_ENGINE_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
"""OpenAI routes a full engine queue answers with 503 (and Retry-After)."""


Node = dict[str, JsonValue]
"""An object of the document (FastAPI's JSON: read and amended in place)."""


def _at(node: Node, *keys: str) -> Node:
    """The object at ``keys`` below ``node``; an empty one (not attached) where a key is
    missing or names something that is not an object."""
    for key in keys:
        child = node.get(key)
        if not isinstance(child, dict):
            return {}
        node = child
    return node


def _child(node: Node, key: str) -> Node:
    """``node[key]``, an object, added (empty) if missing."""
    child = node.setdefault(key, {})
    if not isinstance(child, dict):
        raise TypeError(f"OpenAPI document: {key!r} is not an object")
    return child


def statuses(method: str, path: str, operation: Container[str]) -> set[int]:
    """The error statuses one operation can answer (``operation``: its keys)."""
    if path in PUBLIC:
        return {503} if path == "/readyz" else set()
    if path.startswith(OPENAI):  # invalid requests and conflicts are OpenAI's 400
        codes = {400, 401, 403, 404, 429}
        if "requestBody" in operation:
            codes.add(413)
        return codes | ({503} if path in _ENGINE_PATHS else set())
    codes = {401, 403, 404, 422, 429}
    if "requestBody" in operation:
        codes |= {400, 413}
    if method in _MUTATING:
        codes.add(409)
    if path.startswith(("/api/v1/deployments", "/v2/")):
        codes.add(503)
    return codes | _EXTRA.get((method, path), set())


def amend(document: Node) -> Node:
    """FastAPI's document with kiln's security, errors, patterns and media types."""
    components = _child(document, "components")
    schemas = _child(components, "schemas")
    for model in (ErrorOut, V2ErrorOut):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    # OpenAI's body under a name of its own: kiln's ErrorOut already holds an "ErrorBody"
    schema = OpenAIErrorOut.model_json_schema(ref_template="#/components/schemas/OpenAI{model}")
    for name, sub in schema.pop("$defs", {}).items():
        schemas[f"OpenAI{name}"] = sub
    schemas[OPENAI_ERROR] = schema
    components["securitySchemes"] = {
        SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key: `Authorization: Bearer kiln_...` "
            "(kiln up prints the first admin key and writes it to $KILN_HOME/admin.key).",
        }
    }
    paths = _at(document, "paths")
    for path, item in paths.items():
        for method, operation in item.items() if isinstance(item, dict) else ():
            if method not in {"get", "put", "post", "patch", "delete", "head", "options"}:
                continue
            if isinstance(operation, dict):
                _amend_operation(method, path, operation)
    _upload_name(document)
    if "/metrics" in paths:
        ok = _at(paths, "/metrics", "get", "responses", "200")
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)  # FastAPI's 422 body; kiln answers ErrorOut instead
    for each in schemas.values():
        _no_nul(each)
    return document


def _amend_operation(method: str, path: str, operation: Node) -> None:
    if path not in PUBLIC:
        operation["security"] = [{SCHEME: []}]
    error = "V2ErrorOut" if path.startswith("/v2/") else "ErrorOut"
    if path.startswith(OPENAI):
        error = OPENAI_ERROR
    body: JsonValue = {"application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}}
    responses = _child(operation, "responses")
    if path.startswith(OPENAI):
        responses.pop("422", None)  # FastAPI's own; these routes answer an invalid one 400
    for code in sorted(statuses(method, path, operation)):
        response: Node = {"description": _DESCRIPTIONS[code], "content": body}
        if code == 429:
            response["headers"] = {
                "Retry-After": {
                    "description": "Seconds until the limit lets a request through.",
                    "schema": {"type": "integer"},
                }
            }
        responses[str(code)] = response
    patterned = path.startswith(_PATTERNED)
    parameters = operation.get("parameters")
    for parameter in parameters if isinstance(parameters, list) else []:
        if not isinstance(parameter, dict):
            continue
        schema = _at(parameter, "schema")
        name = parameter.get("name")
        if parameter.get("in") == "path" and patterned and str(name) in _PATH_PATTERNS:
            schema["pattern"] = _PATH_PATTERNS[str(name)]
        if (path, name) == ("/api/v1/usage", "group_by"):
            schema["enum"] = list(PERIODS)  # checked by kiln.monitor.usage
        _no_nul(schema)
    for content in _at(operation, "requestBody", "content").values():
        if isinstance(content, dict):
            _no_nul(_at(content, "schema"))


def _upload_name(document: Node) -> None:
    """The upload form's ``name`` is a dataset name: :data:`SEGMENT_PATTERN`."""
    content = _at(document, "paths", "/api/v1/datasets", "post", "requestBody", "content")
    ref = _at(content, "multipart/form-data", "schema").get("$ref", "")
    form = _at(document, "components", "schemas", str(ref).rsplit("/", 1)[-1])
    name = _at(form, "properties", "name")
    options = name.get("anyOf", [name])
    for option in options if isinstance(options, list) else []:
        if isinstance(option, dict) and option.get("type") == "string":
            option["pattern"] = SEGMENT_PATTERN


def _no_nul(schema: JsonValue) -> None:
    """Strings without a pattern, enum or format get :data:`NO_NUL` (inline ones only)."""
    if not isinstance(schema, dict):  # `true` and `false` are schemas too
        return
    if schema.get("type") == "string" and not {"pattern", "enum", "const", "format"} & set(schema):
        schema["pattern"] = NO_NUL
    for key in ("properties", "$defs"):
        for sub in _at(schema, key).values():
            _no_nul(sub)
    for key in ("anyOf", "oneOf", "allOf"):
        subs = schema.get(key)
        for sub in subs if isinstance(subs, list) else []:
            _no_nul(sub)
    for key in ("items", "additionalProperties"):
        _no_nul(schema.get(key))  # only an object is walked
    if schema.get("type") == "object" and schema.get("additionalProperties") is not False:
        schema.setdefault("propertyNames", {"pattern": NO_NUL})  # keys are text too


def install(app: FastAPI) -> None:
    """Serve :func:`amend`'s document at ``app.openapi_url`` (built once, on first use)."""

    def openapi() -> Node:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = amend(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
