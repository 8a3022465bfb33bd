"""The HTTP API: routes under ``/api/v1`` and ``/v2``, health, one error shape, audit,
size limits.

:func:`create_api` builds the API alone; the application a server runs (the API, the
dashboard, and the deployments' lifespan) is assembled by :func:`kiln.app.create_app`.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, compile_path
from starlette.types import ASGIApp, Lifespan, Message, Receive, Scope, Send

from kiln import __version__
from kiln.api.deps import principal
from kiln.api.guards import TextGuard
from kiln.api.openapi import install as install_openapi
from kiln.api.routes import (
    audit,
    base_models,
    datasets,
    deployments,
    jobs,
    models,
    openai,
    openai_files,
    openai_finetune,
    projects,
    usage,
    v2,
)
from kiln.errors import KilnError, RateLimitError, TooLargeError
from kiln.monitor.audit import record
from kiln.services import Services
from kiln.settings import Settings
from kiln.store.keys import Principal

API = "/api/v1"
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
JSON_BODY_LIMIT = 8 << 20  # bytes; specs and small requests, not uploads
# deployments first: routes are matched in order, and its predict route is the one
# called thousands of times a second (the routers' paths do not overlap)
ROUTERS = (deployments, projects, datasets, jobs, models, audit, usage, base_models)
INFERENCE = {"deployments.predict", "v2.infer", *openai.ROUTE_NAMES}
"""Routes that are metered as requests (Prometheus), not audited: they change nothing."""
UPLOAD_PATHS = (f"{API}/datasets", f"{openai.PREFIX}/files")  # KILN_MAX_UPLOAD_MB bodies


def error_response(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "field": field}}, status_code=status
    )


def create_api(settings: Settings, *, lifespan: Lifespan[FastAPI] | None = None) -> FastAPI:
    """The API's routes, error handlers and middleware, without the dashboard.

    Routes read ``app.state.services`` (a :class:`~kiln.services.Services`) and
    ``app.state.deployments`` (a ``DeploymentManager``): whoever assembles the
    application sets them, in ``lifespan`` or before it runs.
    """
    # /docs and /redoc with their assets from the fastapi-offline package: no CDN
    app = FastAPIOffline(
        title="kiln",
        version=__version__,
        description="Train, register and serve models. Every route but health needs "
        "`Authorization: Bearer <API key>`.",
        lifespan=lifespan,
    )
    _errors(app)
    install_openapi(app)
    # innermost: it reads bodies the size limit around it has already bounded
    app.add_middleware(TextGuard)
    # the audit middleware is outermost, so refused bodies (413) are recorded too
    app.add_middleware(BodyLimit, upload_limit=int(settings.max_upload_mb * (1 << 20)))
    app.add_middleware(Audit)

    # /datasets/import takes POST only; without this, GET would reach /datasets/{dataset_id}
    # and answer 404 for a dataset named "import" where the document promises a 405
    @app.api_route(
        f"{API}/datasets/import", methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    def not_a_dataset() -> None:
        raise StarletteHTTPException(405)

    for module in ROUTERS:
        app.include_router(module.router, prefix=API)
    app.include_router(v2.router)
    app.include_router(openai.router, prefix=openai.PREFIX)  # the OpenAI-compatible API
    app.include_router(openai_files.router, prefix=openai.PREFIX)  # its Files API
    app.include_router(openai_finetune.router, prefix=openai.PREFIX)  # its fine-tuning API
    _health(app)
    return app


def _health(app: FastAPI) -> None:
    """``/healthz``, ``/readyz`` (no key) and ``/metrics`` (any key)."""

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, Any]:
        """Alive (no key needed)."""
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request) -> JSONResponse:
        """Every deployment loaded and warm (no key needed); 503 until then."""
        manager = getattr(request.app.state, "deployments", None)
        ok = manager is not None and manager.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"])
    def metrics(
        request: Request,
        who: Annotated[Principal, Depends(principal)],
        project: Annotated[
            str | None, Query(description="For a global key: only this project's series.")
        ] = None,
    ) -> Response:
        """Prometheus text format (any valid API key; scrape with a bearer token).

        A project's key sees its own project's ``kiln_*`` series only; a global key sees
        every project's (each series has a ``project`` label), or one with ``?project=``.
        """
        from prometheus_client import CONTENT_TYPE_LATEST

        only = who.project if who.project_id is not None else project
        return Response(
            request.app.state.deployments.metrics.render(only), media_type=CONTENT_TYPE_LATEST
        )


def _errors(app: FastAPI) -> None:
    def respond(
        request: Request, status: int, code: str, message: str, field: str | None
    ) -> JSONResponse:
        request.state.error_code = code
        if request.url.path.startswith("/v2/"):  # the Open Inference Protocol's error shape
            return JSONResponse({"error": message}, status_code=status)
        if request.url.path.startswith(f"{openai.PREFIX}/"):  # OpenAI's error shape
            return openai.error_response(status, code, message, field)
        return error_response(status, code, message, field)

    @app.exception_handler(KilnError)
    async def kiln_error(request: Request, exc: KilnError) -> JSONResponse:
        response = respond(request, exc.http_status, exc.code, exc.message, exc.field)
        if exc.retry_after is not None:  # a full queue (503), a spent rate limit (429)
            response.headers["Retry-After"] = str(exc.retry_after)
        if isinstance(exc, RateLimitError):
            from kiln.api.ratelimit import refused

            refused(request, response, exc)  # the refusal counted in the metrics
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
        field = ".".join(loc) or None
        message = f"{field}: {first['msg']}" if field else str(first["msg"])
        return respond(request, 422, "invalid_request", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        # FastAPI's one 400: a body that does not parse as its content type says
        field = "body" if exc.status_code == 400 else None
        response = respond(request, exc.status_code, code, str(exc.detail), field)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = allowed_methods(request.app, request.scope)
        return response


METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(app: FastAPI, scope: Scope) -> str:
    """The ``Allow`` header of a 405: the methods of this path.

    The router names only the first route whose path matched, while one path often has
    a route per method (GET, PATCH and DELETE of a deployment). A documented path answers
    what the OpenAPI document lists for its most specific template (``/datasets/import``,
    not ``/datasets/{dataset_id}``); any other path, each method some route takes.
    """
    path = scope["path"]
    templates = [
        (template.count("{"), template)
        for template in app.openapi().get("paths", {})
        if compile_path(template)[0].match(path)
    ]
    if templates:
        item = app.openapi()["paths"][min(templates)[1]]
        return ", ".join(m for m in METHODS if m.lower() in item)
    return ", ".join(
        method
        for method in METHODS
        if any(r.matches({**scope, "method": method})[0] == Match.FULL for r in app.router.routes)
    )


class Audit:
    """Records every mutating API request in the audit log; meters inference requests.

    A plain ASGI middleware (Starlette's ``BaseHTTPMiddleware`` runs the app in a task
    of its own behind memory streams, which cost more than the routes it wraps). Both
    happen when the response starts, before any of it reaches the caller, so a caller
    that reads /audit after an answer finds its record there.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # reads are neither audited nor metered (inference routes are POSTs)
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            await self.app(scope, receive, send)
            return

        async def send_after(message: Message) -> None:
            if message["type"] == "http.response.start":
                await _audit(scope, message["status"])
            await send(message)

        await self.app(scope, receive, send_after)


async def _audit(scope: Scope, status: int) -> None:
    """A mutating request's response starts: meter it (inference) or audit it."""
    name = getattr(scope.get("route"), "name", None)
    if name in INFERENCE:  # read from the scope: no Request built on the hot path
        state = scope.get("state", {})
        # the OpenAI routes name the deployment in the body (``model``)
        deployment = state.get("served_deployment") or scope.get("path_params", {}).get("name", "")
        version = state.get("served_version", "")
        project = state.get("served_project") or ""  # "": refused before the key was known
        metrics = scope["app"].state.deployments.metrics
        metrics.requests.labels(project, deployment, str(version), str(status)).inc()
        return
    request = Request(scope)
    # /v1's files and fine-tuning jobs are audited as /api/v1's datasets and jobs are
    if request.url.path.startswith((API, f"{openai.PREFIX}/")):
        action = _route_name(request)
        target = getattr(request.state, "audit_target", None) or "/".join(
            f"{k}={v}" for k, v in request.path_params.items()
        )
        who = getattr(request.state, "principal", None)
        outcome = "ok" if status < 400 else getattr(request.state, "error_code", f"http_{status}")
        services: Services = request.app.state.services

        def write() -> None:
            with services.db.session() as s:
                record(
                    s,
                    action=action,
                    target=target,
                    outcome=outcome,
                    status=status,
                    key_id=who.key_id if who else None,
                    project_id=getattr(request.state, "project_id", None)
                    or (who.project_id if who else None),
                )

        await run_in_threadpool(write)


def _route_name(request: Request) -> str:
    """The route's name ("jobs.submit"), also for a request refused before routing (413)."""
    route = request.scope.get("route")
    if route is None:
        scope = {**request.scope, "path": request.url.path.removeprefix(API), "root_path": ""}
        route = next(
            (
                r
                for module in ROUTERS
                for r in module.router.routes
                if r.matches(scope)[0] == Match.FULL
            ),
            None,
        )
    return getattr(route, "name", None) or f"{request.method} {request.url.path}"


class BodyLimit:
    """Refuses bodies over the limit with 413, by Content-Length or while streaming.

    Dataset uploads get ``KILN_MAX_UPLOAD_MB``; every other request 8 MiB.
    """

    def __init__(self, app: ASGIApp, *, upload_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS
        limit = self.upload_limit if upload else JSON_BODY_LIMIT
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        seen = 0
        over = False

        async def limited_receive() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise _TooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            # whatever the app answers once the body ran over (a parse error), the
            # caller gets the 413 instead
            if not over:
                await send(message)

        with suppress(_TooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if over:
            await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        exc = TooLargeError(
            f"request body over the limit of {limit / (1 << 20):.3g} MiB", field="body"
        )
        scope.setdefault("state", {})["error_code"] = exc.code  # for the audit record
        shape = openai.error_response if _is_openai(scope) else error_response
        response = shape(exc.http_status, exc.code, exc.message, exc.field)
        await response(scope, receive, send)


def _is_openai(scope: Scope) -> bool:
    """A request to the OpenAI-compatible routes: its errors take OpenAI's shape."""
    return str(scope.get("path", "")).startswith(f"{openai.PREFIX}/")


class _TooLarge(Exception):  # noqa: N818 - internal signal
    pass
