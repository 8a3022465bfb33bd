"""The chat playground of a generation deployment: ``/deployments/{name}/playground``.

The page (static/playground.js) posts the conversation to
``POST /deployments/{name}/playground/stream`` as a form: the session's CSRF token in
``csrf``, the turns so far as JSON in ``messages`` (``[{"role": "user"|"assistant",
"content": ...}]``, the last one the user's), and ``system``, ``max_tokens``,
``temperature``. The answer is the same Server-Sent Events as a streamed
``/v1/chat/completions`` (``/v1/completions`` for a model whose prompts are not chat),
with the usage chunk, produced by the same service (:mod:`kiln.serve.openai`), metered
as the signed-in key's usage and cancelled when the page goes away. The page never holds
an API key: the endpoint acts for the session's principal, which needs the ``predict``
scope. Refusals before the stream starts are kiln's JSON errors (401 without a session,
403 without the scope or the CSRF token, 409 for a deployment that is no generation one).
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from kiln.api.routes.openai import EventStream
from kiln.errors import ConflictError, DataError, ForbiddenError
from kiln.monitor import token_meter
from kiln.serve import openai as service
from kiln.serve.deployments import DeploymentManager, Live
from kiln.serve.openai_schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamOptions,
)
from kiln.web.deployments import NotServingError, engine_rows, manager_of
from kiln.web.pages import PageRoute, Viewer, json_viewer, render, viewer
from kiln.web.session import CSRF_FIELD, check_csrf

router = APIRouter(route_class=PageRoute, include_in_schema=False)
api = APIRouter(include_in_schema=False)

GENERATION = "generation"
DEFAULT_MAX_TOKENS = 256
MAX_TURNS = 200  # a conversation longer than this is refused (the context would not hold it)


class Turn(BaseModel):
    """One turn of the playground's conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str = Field(max_length=100_000)


_TURNS = TypeAdapter(list[Turn])


class PlaygroundRequest(BaseModel):
    """The playground form, parsed (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Turn] = Field(min_length=1, max_length=MAX_TURNS)
    system: str = Field(default="", max_length=100_000)
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)


def generation_deployment(manager: DeploymentManager | None, project_id: int, name: str) -> Live:
    """The project's deployment ``name`` if it serves a generation model: NotFoundError
    for an unknown one, ConflictError (409) for a classic or embedding deployment."""
    if manager is None:
        raise NotServingError("serving is not running in this server")
    live = manager.get(project_id, name)
    if live.task != GENERATION:
        task = live.task or live.state.value
        raise ConflictError(
            f"deployment {live.name} serves no generation model ({task}); "
            "the playground chats with generation deployments",
            field="name",
        )
    return live


def prompt_format(live: Live) -> str:
    """``chat``, ``completion`` or ``text``: how the deployment's model takes prompts."""
    served = live.routes[0].served
    bundle = getattr(served, "bundle", None)
    generation = getattr(bundle, "generation", None)
    return str(getattr(generation, "prompt_format", "chat"))


@router.get("/deployments/{name}/playground", name="web.playground")
def playground_page(
    request: Request, name: str, who: Annotated[Viewer, Depends(viewer)]
) -> Response:
    live = generation_deployment(manager_of(request), who.project.id, name)
    return render(
        request,
        "playground.html",
        title=f"Playground · {live.name}",
        live=live,
        chat=prompt_format(live) == "chat",
        engines=engine_rows(live),
        can_predict=who.can("predict"),
        default_max_tokens=DEFAULT_MAX_TOKENS,
    )


def parse_form(fields: dict[str, str]) -> PlaygroundRequest:
    """The form's fields as a :class:`PlaygroundRequest`; DataError naming the field."""
    try:
        turns = _TURNS.validate_json(fields.get("messages") or "[]")
    except ValidationError as exc:
        raise DataError(f"messages: {_first(exc)}", field="messages") from None
    try:
        return PlaygroundRequest(
            messages=turns,
            system=fields.get("system", ""),
            max_tokens=fields.get("max_tokens") or DEFAULT_MAX_TOKENS,
            temperature=fields.get("temperature") or 1.0,
        )
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise DataError(f"{where}: {_first(exc)}", field=where or None) from None


def _first(exc: ValidationError) -> str:
    errors = exc.errors()
    return str(errors[0]["msg"]) if errors else "invalid"


def chat_request(name: str, form: PlaygroundRequest) -> ChatCompletionRequest:
    """The form as a streamed chat request (with the usage chunk)."""
    messages = [ChatMessage(role="system", content=form.system)] if form.system.strip() else []
    messages += [ChatMessage(role=t.role, content=t.content) for t in form.messages]
    return ChatCompletionRequest(
        model=name,
        messages=messages,
        max_tokens=form.max_tokens,
        temperature=form.temperature,
        stream=True,
        stream_options=StreamOptions(include_usage=True),
    )


def completion_request(name: str, form: PlaygroundRequest) -> CompletionRequest:
    """The form as a streamed completion of the last turn's text (a model whose prompts
    are not chat has no system prompt nor turns)."""
    return CompletionRequest(
        model=name,
        prompt=form.messages[-1].content,
        max_tokens=form.max_tokens,
        temperature=form.temperature,
        stream=True,
        stream_options=StreamOptions(include_usage=True),
    )


@api.post("/deployments/{name}/playground/stream", name="web.playground_stream")
async def playground_stream(
    request: Request, name: str, who: Annotated[Viewer, Depends(json_viewer)]
) -> EventStream:
    """Stream the deployment's answer to the playground's conversation (SSE)."""
    form = await request.form()
    check_csrf(who.session.csrf, form.get(CSRF_FIELD))
    if not who.can("predict"):
        raise ForbiddenError("this key lacks the 'predict' scope", field="scopes")
    fields = {k: v for k, v in form.items() if isinstance(v, str) and k != CSRF_FIELD}
    body = parse_form(fields)
    manager = manager_of(request)
    generation_deployment(manager, who.project.id, name)
    assert manager is not None  # generation_deployment refuses without one
    await token_meter.prepare(manager.monitor.meter, who.project.id)
    # no await from here to the submit: a route retired meanwhile closes its engine
    live, route, lm = manager.language_model(who.project.id, name)
    key = token_meter.key_of(who.principal.key_id)
    by = token_meter.ServedBy(live.project_id, live.project, live.name, route.version, key)
    token_meter.watch_engine(lm.engine, manager.metrics.llm, by.labels)
    use = token_meter.TokenUse(manager.monitor.meter, manager.metrics.llm, by, streamed=True)
    answering = service.Answering(live.name, route.version)
    if lm.bundle.generation.prompt_format == "chat":
        start = partial(service.chat_stream, lm, chat_request(live.name, body), answering)
    else:
        start = partial(
            service.completion_stream, lm, completion_request(live.name, body), answering
        )
    return EventStream(token_meter.streamed(use, start))
