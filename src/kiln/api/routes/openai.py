"""The OpenAI-compatible routes under ``/v1`` (the official ``openai`` client works as is).

- ``GET /v1/models``, ``GET /v1/models/{id}``: the project's deployments of generation
  and embedding models (``id`` is the deployment's name, ``owned_by`` the project), and
  its fine-tuned models by their ``ft:`` ids.
- ``POST /v1/chat/completions``, ``POST /v1/completions``: generation deployments,
  streamed (Server-Sent Events) or not; see :mod:`kiln.serve.openai`.
- ``POST /v1/embeddings``: embedding deployments.

Auth: ``Authorization: Bearer <kiln key>`` with the ``predict`` scope (any valid key for
the model list). ``model`` is the deployment's name; a project key acts on its own
project, a global key on the one named by the ``OpenAI-Project`` header (the client's
``project=``) or the ``project`` query parameter, else ``default``.

Errors on these paths are in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}`` (:func:`error_response`), with the statuses the client maps to its own
exception classes: 400 (kiln's 409 and 422 too), 401, 403, 404, 429, 503 with
``Retry-After``.

Tokens are metered per (deployment, key) and the project's ``tokens`` quota enforced by
:mod:`kiln.monitor.token_meter`: a request past it is a 429 (``insufficient_quota``);
a stream that reaches it ends with ``finish_reason`` ``"length"``, the usage chunk and
an error event before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from kiln.api.deps import principal
from kiln.api.routes.deployments import Manager
from kiln.errors import KilnError, NotFoundError
from kiln.monitor import token_meter
from kiln.serve import openai as service
from kiln.serve import openai_finetune
from kiln.serve.deployments import DeploymentManager, Live
from kiln.serve.openai_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    CreateEmbeddingResponse,
    EmbeddingRequest,
    ErrorBody,
    ErrorDetail,
    Model,
    ModelList,
)
from kiln.services import Services
from kiln.store.keys import Principal
from kiln.store.projects import project_for
from kiln.store.tables import Deployment

router = APIRouter(tags=["openai"])
PREFIX = "/v1"
ROUTE_NAMES = frozenset({"openai.chat", "openai.completions", "openai.embeddings"})
"""The inference routes (metered as requests, not audited)."""
LM_TASKS = ("generation", "embedding")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}
_CODES = {
    "unauthorized": "invalid_api_key",
    "rate_limited": "rate_limit_exceeded",
    "quota_exceeded": "insufficient_quota",
}
"""kiln's error codes that OpenAI names otherwise; the rest keep kiln's code."""


def error_response(status: int, code: str, message: str, field: str | None) -> JSONResponse:
    """An error in OpenAI's shape. kiln's 409 (a conflict: a deployment of another kind,
    one that is loading) and 422 (an invalid request) are OpenAI's 400."""
    status = 400 if status in (409, 422) else status
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = ErrorBody(
        error=ErrorDetail(message=message, type=kind, param=field, code=_CODES.get(code, code))
    )
    return JSONResponse(body.model_dump(), status_code=status)


# ---- who is calling ---------------------------------------------------------------------


ProjectQuery = Annotated[str | None, Query(description="For a global key: the project to act on.")]
ProjectHeader = Annotated[
    str | None,
    Header(alias="OpenAI-Project", description="As the `project` query parameter."),
]


async def inference_project(
    request: Request,
    who: Annotated[Principal, Depends(principal)],
    project: ProjectQuery = None,
    openai_project: ProjectHeader = None,
) -> int:
    """The project of a caller holding the ``predict`` scope."""
    who.require("predict")
    return await _project_of(request, who, project or openai_project)


async def reader_project(
    request: Request,
    who: Annotated[Principal, Depends(principal)],
    project: ProjectQuery = None,
    openai_project: ProjectHeader = None,
) -> int:
    """The project of a caller with any valid key (the model list)."""
    return await _project_of(request, who, project or openai_project)


async def _project_of(request: Request, who: Principal, requested: str | None) -> int:
    """The caller's project (no database read for a project key that names none)."""
    if who.project_id is not None and requested is None:
        request.state.served_project = who.project  # the metrics' project label
        return who.project_id
    svc: Services = request.app.state.services
    project_id, request.state.served_project = await run_in_threadpool(
        _project, svc, who, requested
    )
    return project_id


def _project(svc: Services, who: Principal, requested: str | None) -> tuple[int, str]:
    with svc.db.session() as s:
        row = project_for(s, who, requested)
        return row.id, row.name


InferenceProject = Annotated[int, Depends(inference_project)]
ReaderProject = Annotated[int, Depends(reader_project)]


# ---- models -----------------------------------------------------------------------------


@router.get("/models", name="openai.models")
async def list_models(project_id: ReaderProject, deployments: Manager) -> ModelList:
    """The project's generation and embedding deployments, by name, and its fine-tuned
    models by their ``ft:`` ids (deployed on first use: :mod:`kiln.serve.openai_finetune`)."""
    lives = [d for d in deployments.of_project(project_id) if d.task in LM_TASKS]
    created = await run_in_threadpool(_created, deployments, project_id)
    tuned = await run_in_threadpool(openai_finetune.fine_tuned_models, deployments.db, project_id)
    return ModelList(data=[_model(d, created) for d in lives] + tuned)


@router.get("/models/{model_id}", name="openai.model")
async def get_model(model_id: str, project_id: ReaderProject, deployments: Manager) -> Model:
    """A deployment by name, or a fine-tuned model of the project by its ``ft:`` id (as
    the list shows it; a 404 for another project's)."""
    if model_id.startswith(openai_finetune.FT_PREFIX):
        return await run_in_threadpool(
            openai_finetune.fine_tuned_model, deployments.db, project_id, model_id
        )
    live = _lm_deployment(deployments, project_id, model_id)
    created = await run_in_threadpool(_created, deployments, project_id)
    return _model(live, created)


def _lm_deployment(deployments: DeploymentManager, project_id: int, name: str) -> Live:
    live = deployments.live.get((project_id, name))
    if live is None or live.task not in LM_TASKS:
        raise _no_model(name)
    return live


def _model(live: Live, created: dict[str, int]) -> Model:
    return Model(id=live.name, created=created.get(live.name, 0), owned_by=live.project)


def _created(deployments: DeploymentManager, project_id: int) -> dict[str, int]:
    """Each deployment's creation time in Unix seconds."""
    with deployments.db.session() as s:
        rows = s.execute(
            select(Deployment.name, Deployment.created_at).where(
                Deployment.project_id == project_id
            )
        ).all()
    return {name: int(_utc(at).timestamp()) for name, at in rows}


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _no_model(name: str) -> NotFoundError:
    return NotFoundError(
        f"the model {name!r} does not exist: no generation or embedding deployment "
        "of that name in this project",
        field="model",
    )


# ---- inference --------------------------------------------------------------------------

Req = TypeVar("Req", ChatCompletionRequest, CompletionRequest)
Resp = TypeVar("Resp", ChatCompletion, Completion)


@router.post(
    "/chat/completions",
    name="openai.chat",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(
    body: ChatCompletionRequest,
    project_id: InferenceProject,
    deployments: Manager,
    request: Request,
) -> ChatCompletion | EventStream:
    """A chat completion; ``stream: true`` sends ``chat.completion.chunk`` events."""
    return await _generate(
        body, project_id, deployments, request, service.chat_stream, service.chat_completion
    )


@router.post(
    "/completions",
    name="openai.completions",
    response_model=Completion,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def completions(
    body: CompletionRequest,
    project_id: InferenceProject,
    deployments: Manager,
    request: Request,
) -> Completion | EventStream:
    """A text completion of raw ``prompt`` text (or token ids); streamed as SSE too."""
    return await _generate(
        body, project_id, deployments, request, service.completion_stream, service.completion
    )


async def _generate(
    body: Req,
    project_id: int,
    deployments: DeploymentManager,
    request: Request,
    stream: Callable[[service.LanguageModel, Req, service.Answering], service.SSEAnswer],
    answer: Callable[[service.LanguageModel, Req, service.Answering], Awaitable[Resp]],
) -> Resp | EventStream:
    """Pick the deployment's route (an ``ft:`` model is deployed on first use), meter its
    tokens, then stream the answer as SSE or return it whole."""
    await token_meter.prepare(deployments.monitor.meter, project_id)
    with _model_param(body.model):
        key_id = request.state.principal.key_id
        name = await openai_finetune.served_name(deployments, project_id, body.model, key_id=key_id)
        live, route, lm = deployments.language_model(project_id, name)
        _served(request, live, route.version)
        who = service.Answering(body.model, route.version)
        use = _token_use(request, deployments, live, route.version, lm, streamed=body.stream)
        # no await between the pick and the submit (a retired engine refuses)
        if body.stream:
            return EventStream(token_meter.streamed(use, partial(stream, lm, body, who)))
        return await token_meter.answered(use, answer(lm, body, who))


@router.post("/embeddings", name="openai.embeddings")
async def embeddings(
    body: EmbeddingRequest,
    project_id: InferenceProject,
    deployments: Manager,
    request: Request,
) -> CreateEmbeddingResponse:
    """Pooled, normalised vectors of ``input``; ``encoding_format`` float or base64."""
    await token_meter.prepare(deployments.monitor.meter, project_id)
    with _model_param(body.model):
        live, route, embedder = deployments.embedder(project_id, body.model)
        _served(request, live, route.version)
        use = _token_use(request, deployments, live, route.version, None, streamed=True)
        who = service.Answering(body.model, route.version)
        return await token_meter.embedded(use, partial(service.embeddings, embedder, body, who))


def _token_use(
    request: Request,
    deployments: DeploymentManager,
    live: Live,
    version: int,
    lm: service.LanguageModel | None,
    *,
    streamed: bool,
) -> token_meter.TokenUse:
    """The request's token metering (:mod:`kiln.monitor.token_meter`); the engine of
    ``lm`` reports its gauges under the deployment from now on."""
    who: Principal = request.state.principal
    key = token_meter.key_of(who.key_id)
    by = token_meter.ServedBy(live.project_id, live.project, live.name, version, key)
    llm = deployments.metrics.llm
    if lm is not None:
        token_meter.watch_engine(lm.engine, llm, by.labels)
    return token_meter.TokenUse(deployments.monitor.meter, llm, by, streamed=streamed)


def _served(request: Request, live: Live, version: int) -> None:
    """What the request metrics label it with (read by the audit middleware)."""
    request.state.served_version = version
    request.state.served_deployment = live.name


@contextmanager
def _model_param(name: str) -> Iterator[None]:
    """Errors about the deployment name the request's ``model`` param; an unknown one is
    OpenAI's 404 for a model."""
    try:
        yield
    except KilnError as exc:
        if isinstance(exc, NotFoundError) and exc.field == "name":
            raise _no_model(name) from None
        if exc.field == "name":
            exc.field = "model"
        raise


# ---- streaming --------------------------------------------------------------------------


class EventStream(StreamingResponse):
    """Server-Sent Events of one streamed answer.

    It watches the connection while it streams: a client that disconnects cancels every
    sequence of the request at once (not only at the next write, which an idle stream
    would not make), and however the response ends the sequences are cancelled.
    """

    def __init__(self, answer: service.SSEAnswer) -> None:
        super().__init__(
            answer.chunks,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.answer.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await self.stream_response(send)
        except OSError:  # the client went away while a chunk was being sent
            pass
        finally:
            watcher.cancel()
            await self.answer.aclose()
