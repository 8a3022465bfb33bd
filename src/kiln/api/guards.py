"""Refuses text that no store keeps: NUL characters and lone UTF-16 surrogates.

PostgreSQL rejects ``\\x00`` in text columns and no engine can encode a lone surrogate
as UTF-8, so such a string reaching a query or an audit record used to be a 500. The
:class:`TextGuard` middleware answers 422 naming the parameter or body field instead,
before any route runs: for path and query parameters, JSON bodies and urlencoded forms.

Multipart bodies are not scanned (their file parts are binary); their text fields go
through :func:`~kiln.store.artifacts.safe_segment`, which refuses control characters.
KServe v2 bodies are not scanned either: BYTES tensors carry arbitrary bytes, and the
v2 parser answers for them. A clean request costs one regular-expression scan of the
raw body; the JSON is parsed only when that scan finds an escape worth a look.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.api.routes import openai

# \u0000 and \uD800-\uDFFF escapes in JSON text; valid surrogate pairs match too and
# come out of json.loads joined, so they pass the walk below
_JSON_SUSPECT = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
_URL_NUL = re.compile(rb"%00|\x00")
_SURROGATE = re.compile("[\ud800-\udfff]")


def bad_text(value: str) -> bool:
    """Whether ``value`` holds a NUL or a lone surrogate."""
    return "\x00" in value or _SURROGATE.search(value) is not None


def first_bad_field(value: Any, path: tuple[str, ...] = ()) -> str | None:
    """The dotted path (``spec.data.source``, ``inputs.0.text``) of the first string, key
    or value, that holds a NUL or a lone surrogate in decoded JSON; ``None`` if none."""
    if isinstance(value, str):
        return ".".join(path) or "body" if bad_text(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if bad_text(key):
                return ".".join(path) or "body"
            found = first_bad_field(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = first_bad_field(item, (*path, str(index)))
            if found is not None:
                return found
    return None


class TextGuard:
    """ASGI middleware: 422 for NUL or lone surrogates in the path, query or body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        field = self._path_field(scope) or self._query_field(scope)
        if field is not None:
            await _refuse(scope, receive, send, field)
            return
        # FastAPI parses a body without a Content-Type as JSON: scan it as JSON too
        kind = _content_type(scope) or "application/json"
        scanned = kind.endswith("json") or kind == "application/x-www-form-urlencoded"
        if not scanned or scope["method"] in ("GET", "HEAD") or scope["path"].startswith("/v2/"):
            await self.app(scope, receive, send)
            return
        body, rest = await _read_body(receive)
        field = _body_field(body, form=not kind.endswith("json"))
        if field is not None:
            await _refuse(scope, receive, send, field)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await rest()

        await self.app(scope, replay, send)

    @staticmethod
    def _path_field(scope: Scope) -> str | None:
        path: str = scope["path"]
        if not bad_text(path):
            return None
        # only on this error path: which parameter of the documented routes holds it
        app = scope.get("app")
        document = app.openapi() if app is not None and hasattr(app, "openapi") else {}
        for template in document.get("paths", {}):
            matched = compile_path(template)[0].match(path)
            if matched is not None:
                for name, value in matched.groupdict().items():
                    if bad_text(value):
                        return name
        return "path"

    @staticmethod
    def _query_field(scope: Scope) -> str | None:
        query: bytes = scope.get("query_string", b"")
        if not _URL_NUL.search(query):
            return None
        return _form_field(query)


def _form_field(raw: bytes, where: str = "query") -> str | None:
    """The first key whose value holds a NUL in urlencoded ``raw`` (``where`` if a key does)."""
    for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True, encoding="utf-8"):
        if "\x00" in key:
            return where
        if "\x00" in value:
            return key
    return None


def _body_field(body: bytes, *, form: bool) -> str | None:
    if form:
        return _form_field(body, "body") if _URL_NUL.search(body) else None
    if not _JSON_SUSPECT.search(body):
        return None
    try:
        return first_bad_field(json.loads(body))
    except ValueError:  # not JSON: the route's own parser says so
        return None
    except RecursionError:  # nested too deep to look through: refused, never a 500
        return "body"


def _content_type(scope: Scope) -> str:
    for name, value in scope.get("headers") or ():
        if name == b"content-type":
            kind: str = value.decode("latin-1")
            return kind.split(";", 1)[0].strip().lower()
    return ""


async def _read_body(receive: Receive) -> tuple[bytes, Receive]:
    """The whole request body (the size limit outside this middleware bounds it), and
    what to receive after it: a disconnect that ended it early comes next."""
    chunks: list[bytes] = []
    message = await receive()
    while message["type"] == "http.request":
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), receive
        message = await receive()
    pending: list[Message] = [message]

    async def after() -> Message:
        return pending.pop() if pending else await receive()

    return b"".join(chunks), after


async def _refuse(scope: Scope, receive: Receive, send: Send, field: str) -> None:
    message = f"{field}: NUL characters and unpaired surrogates are not allowed in text"
    scope.setdefault("state", {})["error_code"] = "invalid_request"  # for the audit record
    body: dict[str, Any] = {
        "error": {"code": "invalid_request", "message": message, "field": field}
    }
    if scope["path"].startswith("/v2/"):  # the Open Inference Protocol's error shape
        body = {"error": message}
    if scope["path"].startswith(f"{openai.PREFIX}/"):  # OpenAI's shape, which its client reads
        await openai.error_response(422, "invalid_request", message, field)(scope, receive, send)
        return
    await JSONResponse(body, status_code=422)(scope, receive, send)
