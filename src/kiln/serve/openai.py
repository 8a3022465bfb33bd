"""The OpenAI-compatible service: requests in OpenAI's shapes, answered by the engine.

A chat request's messages become prompt ids through the bundle's chat template
(:meth:`~kiln.lm_bundle.LMBundle.prompt_ids`); a completion request's prompt is raw
text (tokenized as completion examples are for training: BOS where the tokenizer adds
one), or token ids of the bundle's own tokenizer used as given. Sampling starts from
the bundle's ``generation.json`` defaults; the request's ``max_completion_tokens``
(else ``max_tokens``), ``temperature``, ``top_p`` and ``seed`` replace them, and its
``stop`` strings are added to the bundle's. ``max_tokens`` is cut to what the model's
context leaves after the prompt (``finish_reason`` ``"length"`` then says so); a prompt
that leaves no room at all is a 400.

``n`` > 1 submits ``n`` sequences per prompt; with a ``seed``, choice ``i`` samples with
``seed + i`` (so a request is reproducible as a whole and its choices differ). Every
choice's ``finish_reason`` is the engine's, ``"stop"`` or ``"length"``; ``usage``
counts the prompt ids once per prompt and the tokens the engine generated for every
choice (an end-of-sequence token included).

A streamed answer is Server-Sent Events, ``data: {chunk}\\n\\n`` lines as OpenAI sends
them: per choice a first chunk with the role, content deltas, a chunk with its
``finish_reason``; then, with ``stream_options.include_usage``, one chunk with no
choices and the usage; then ``data: [DONE]``. However the answer ends (a finished
stream, a client that went away, an error), every sequence of the request is
cancelled, so its engine slot is free at the next step.

Structured output: ``response_format`` ``json_object`` (any JSON object) or
``json_schema`` (its ``schema``) is enforced during decoding by llguidance, on the torch
engine and on onnxruntime-genai's (its own guidance) alike; the answer is compact JSON
(no free whitespace) and ends once the grammar is complete, so it parses, unless
``max_tokens`` cuts it first: then ``finish_reason`` is ``"length"`` and the text may
not parse (OpenAI's behaviour too). A schema llguidance cannot enforce is a 400 naming
``response_format``.

``presence_penalty``/``frequency_penalty`` follow OpenAI's definition over the tokens
generated so far. ``logprobs`` (chat: ``logprobs: true`` + ``top_logprobs`` 0..20;
completions: ``logprobs`` 0..5 alternatives) are ``log_softmax`` of the processed
logits at temperature 1 (penalties and the grammar mask applied, temperature and top_p
not; see ``kiln.runtime.logits_processing``); an end-of-sequence token has none, and a
streamed chunk carries the records of the tokens it streams. Completions'
``text_offset`` counts characters of the token texts from the start of the choice's
text. An onnxruntime-genai deployment refuses penalties and logprobs (400 naming the
param: its engine has neither).

Refused (400 naming the param): ``logit_bias``, ``tools``, ``echo``, ``suffix``,
``best_of`` > n. Embeddings refuse ``dimensions`` other than the model's own.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from pydantic import BaseModel

from kiln.data.dialogs import Message
from kiln.errors import DataError
from kiln.lm_bundle import EmbeddingBundle, LMBundle
from kiln.monitor import token_meter
from kiln.runtime.generation import SamplingParams, check_params, within_context
from kiln.runtime.logits_processing import TokenLogprob, check_processing, json_schema_text
from kiln.serve.engine import GenerationEngine, SequenceStream, TokenEvent
from kiln.serve.openai_schemas import (
    MAX_SEQUENCES,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChatTokenLogprob,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CreateEmbeddingResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingUsage,
    FinishReason,
    ResponseFormat,
    TopLogprob,
    Usage,
)

DONE = "data: [DONE]\n\n"


class LanguageModel(Protocol):
    """What the service needs of a served language model (``kiln.serve.lm.ServedLM``)."""

    @property
    def bundle(self) -> LMBundle: ...

    @property
    def engine(self) -> GenerationEngine: ...


class Embedder(Protocol):
    """What the service needs of a served encoder (``kiln.serve.lm.ServedEmbedder``)."""

    @property
    def bundle(self) -> EmbeddingBundle: ...

    async def embed_async(self, texts: list[str], field: str = "input") -> np.ndarray: ...

    def count_tokens(self, texts: list[str]) -> int: ...


@dataclass(frozen=True)
class Answering:
    """Who answers: the deployment's name (OpenAI's ``model``) and the version that
    serves this request (``system_fingerprint`` ``v<version>``)."""

    model: str
    version: int

    @property
    def fingerprint(self) -> str:
        return f"v{self.version}"


@dataclass(frozen=True)
class _Plan:
    """The sequences of one request: per prompt its ids, per choice its params."""

    prompts: list[list[int]]
    choices: list[tuple[int, SamplingParams]]  # (prompt index, params), by choice index
    max_field: str  # the request's name of max_new_tokens (max_tokens, ...)
    logprobs_field: str = "logprobs"  # the request's name of SamplingParams.logprobs


# ---- chat completions -----------------------------------------------------------------


def chat_prompt(lm: LanguageModel, messages: Sequence[ChatMessage]) -> list[int]:
    """The prompt ids of ``messages`` through the bundle's chat template (a chat bundle
    only: a completion-format bundle is a 400 that names /v1/completions)."""
    fmt = lm.bundle.generation.prompt_format
    if fmt != "chat":
        raise DataError(
            f"model {lm.bundle.name} takes {fmt} prompts, not chat messages; use /v1/completions",
            field="messages",
        )
    turns = [
        Message(role="system" if m.role == "developer" else m.role, content=m.text())
        for m in messages
    ]
    try:
        return lm.bundle.prompt_ids(turns)
    except DataError as exc:  # the chat template refused the conversation
        raise DataError(exc.message, field="messages") from None


async def chat_completion(
    lm: LanguageModel, request: ChatCompletionRequest, who: Answering
) -> ChatCompletion:
    """The whole answer of a non-streamed chat request."""
    plan = _chat_plan(lm, request)
    results = await _collect_all(_submit(lm.engine, plan))
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=text),
            finish_reason=_finish(last),
            logprobs=_chat_logprobs(records) if request.logprobs else None,
        )
        for i, (text, last, records) in enumerate(results)
    ]
    return ChatCompletion(
        id=_id("chatcmpl"),
        created=int(time.time()),
        model=who.model,
        system_fingerprint=who.fingerprint,
        choices=choices,
        usage=_usage(plan, [last for _, last, _ in results]),
    )


def chat_stream(lm: LanguageModel, request: ChatCompletionRequest, who: Answering) -> SSEAnswer:
    """A streamed chat answer; the request is checked and submitted now (errors are
    raised here, before any byte is sent)."""
    plan = _chat_plan(lm, request)
    streams = _submit(lm.engine, plan)
    return _answer(streams, _chat_chunks(plan, streams, request, who))


def _chat_plan(lm: LanguageModel, request: ChatCompletionRequest) -> _Plan:
    _refuse_unsupported(request)
    if request.top_logprobs is not None and not request.logprobs:
        raise DataError("top_logprobs needs logprobs: true", field="top_logprobs")
    if request.tools or request.tool_choice not in (None, "none"):
        raise DataError("tools are not supported", field="tools")
    ids = chat_prompt(lm, request.messages)
    limit = request.max_completion_tokens or request.max_tokens
    field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    schema = response_schema(request.response_format)
    return _plan(lm, [ids], request, limit, "messages", field, schema, logprobs, "top_logprobs")


def response_schema(response_format: ResponseFormat | None) -> str | None:
    """The JSON schema text ``response_format`` asks the answer to match (None: free
    text); a json_schema without a schema is a 400 naming response_format."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_schema_text({"type": "object"})
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise DataError(
            "response_format json_schema needs json_schema.schema", field="response_format"
        )
    return json_schema_text(spec.json_schema)


def _chat_logprobs(records: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=r.token,
                logprob=r.logprob,
                bytes=list(r.bytes),
                top_logprobs=[
                    TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.bytes)) for t in r.top
                ],
            )
            for r in records
        ]
    )


async def _chat_chunks(
    plan: _Plan, streams: list[SequenceStream], request: ChatCompletionRequest, who: Answering
) -> AsyncIterator[str]:
    template = ChatCompletionChunk(
        id=_id("chatcmpl"),
        created=int(time.time()),
        model=who.model,
        system_fingerprint=who.fingerprint,
        choices=[],
    )

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return _sse(template.model_copy(update={"choices": choices, "usage": usage}))

    for i in range(len(streams)):
        yield chunk([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content=""))])
    lasts: list[TokenEvent | None] = [None] * len(streams)
    async for i, event in _merged(streams):
        if event.finish_reason == "cancelled":  # the server closes: nothing more comes
            return
        if event.text or (request.logprobs and event.logprobs):
            logprobs = _chat_logprobs(event.logprobs) if request.logprobs else None
            delta = ChunkDelta(content=event.text)
            yield chunk([ChunkChoice(index=i, delta=delta, logprobs=logprobs)])
        if event.finish_reason is not None:
            lasts[i] = event
            yield chunk([ChunkChoice(index=i, delta=ChunkDelta(), finish_reason=_finish(event))])
    if request.stream_options is not None and request.stream_options.include_usage:
        yield chunk([], _usage(plan, [e for e in lasts if e is not None]))
    yield DONE


# ---- completions ----------------------------------------------------------------------


def completion_prompts(lm: LanguageModel, prompt: CompletionRequest) -> list[list[int]]:
    """The prompt ids of a completion request: raw text, or token ids as given."""
    from kiln.data.lm_encode import prompt_ids

    texts = _items(prompt.prompt)
    if not texts:
        raise DataError("prompt must not be empty", field="prompt")
    if len(texts) * prompt.n > MAX_SEQUENCES:
        raise DataError(
            f"{len(texts)} prompts x n={prompt.n} is more than the {MAX_SEQUENCES} sequences "
            "one request may ask for; send them in several requests",
            field="prompt",
        )
    vocab = len(lm.bundle.tokenizer)
    prompts = []
    for item in texts:
        if isinstance(item, str):
            ids = prompt_ids(lm.bundle.tokenizer, item, chat=False)
        else:
            if any(t >= vocab for t in item):
                raise DataError(f"token ids must be below {vocab}", field="prompt")
            ids = list(item)
        if not ids:
            raise DataError("a prompt must have at least one token", field="prompt")
        prompts.append(ids)
    return prompts


async def completion(lm: LanguageModel, request: CompletionRequest, who: Answering) -> Completion:
    """The whole answer of a non-streamed completion request."""
    plan = _completion_plan(lm, request)
    results = await _collect_all(_submit(lm.engine, plan))
    want = request.logprobs is not None
    choices = [
        CompletionChoice(
            index=i,
            text=text,
            finish_reason=_finish(last),
            logprobs=_completion_logprobs(records, 0) if want else None,
        )
        for i, (text, last, records) in enumerate(results)
    ]
    return Completion(
        id=_id("cmpl"),
        created=int(time.time()),
        model=who.model,
        system_fingerprint=who.fingerprint,
        choices=choices,
        usage=_usage(plan, [last for _, last, _ in results]),
    )


def completion_stream(lm: LanguageModel, request: CompletionRequest, who: Answering) -> SSEAnswer:
    """A streamed completion; checked and submitted now, as :func:`chat_stream`."""
    plan = _completion_plan(lm, request)
    streams = _submit(lm.engine, plan)
    return _answer(streams, _completion_chunks(plan, streams, request, who))


def _completion_plan(lm: LanguageModel, request: CompletionRequest) -> _Plan:
    _refuse_unsupported(request)
    if request.echo:
        raise DataError("echo is not supported yet", field="echo")
    if request.suffix:
        raise DataError("suffix is not supported", field="suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise DataError("best_of other than n is not supported", field="best_of")
    prompts = completion_prompts(lm, request)
    return _plan(
        lm, prompts, request, request.max_tokens, "prompt", "max_tokens", None, request.logprobs
    )


def _completion_logprobs(records: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    """Legacy logprobs of ``records``; ``offset``: characters of the choice's text before
    the first of them."""
    offsets = []
    for r in records:
        offsets.append(offset)
        offset += len(r.token)
    return CompletionLogprobs(
        tokens=[r.token for r in records],
        token_logprobs=[r.logprob for r in records],
        top_logprobs=[{t.token: t.logprob for t in r.top} for r in records],
        text_offset=offsets,
    )


async def _completion_chunks(
    plan: _Plan, streams: list[SequenceStream], request: CompletionRequest, who: Answering
) -> AsyncIterator[str]:
    template = Completion(
        id=_id("cmpl"),
        created=int(time.time()),
        model=who.model,
        system_fingerprint=who.fingerprint,
        choices=[],
    )

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return _sse(template.model_copy(update={"choices": choices, "usage": usage}))

    lasts: list[TokenEvent | None] = [None] * len(streams)
    offsets = [0] * len(streams)  # characters of token text streamed per choice
    want = request.logprobs is not None
    async for i, event in _merged(streams):
        if event.finish_reason == "cancelled":
            return
        if event.text or (want and event.logprobs):
            logprobs = _completion_logprobs(event.logprobs, offsets[i]) if want else None
            offsets[i] += sum(len(r.token) for r in event.logprobs)
            yield chunk([CompletionChoice(index=i, text=event.text, logprobs=logprobs)])
        if event.finish_reason is not None:
            lasts[i] = event
            yield chunk([CompletionChoice(index=i, text="", finish_reason=_finish(event))])
    if request.stream_options is not None and request.stream_options.include_usage:
        yield chunk([], _usage(plan, [e for e in lasts if e is not None]))
    yield DONE


# ---- embeddings -----------------------------------------------------------------------


async def embeddings(
    embedder: Embedder, request: EmbeddingRequest, who: Answering
) -> CreateEmbeddingResponse:
    """Pooled, normalised vectors of ``input`` (token ids: the bundle's own tokenizer's,
    decoded to text first); base64 is the little-endian float32 bytes, as OpenAI's."""
    dims = embedder.bundle.dimensions
    if request.dimensions is not None and request.dimensions != dims:
        raise DataError(
            f"model {who.model} has {dims} dimensions and cannot shorten them; "
            f"leave dimensions out or pass {dims}",
            field="dimensions",
        )
    texts = embedding_texts(embedder, request)
    vectors = await embedder.embed_async(texts)  # (N, D) float32, on the embedder's thread
    tokens = embedder.count_tokens(texts)
    data = [
        Embedding(index=i, embedding=_encoded(row, request.encoding_format))
        for i, row in enumerate(np.asarray(vectors, dtype=np.float32))
    ]
    return CreateEmbeddingResponse(
        data=data, model=who.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    )


def embedding_texts(embedder: Embedder, request: EmbeddingRequest) -> list[str]:
    """``input`` as a list of texts; empty input (or an empty string) is a 400."""
    from kiln.serve.openai_schemas import MAX_EMBEDDING_INPUTS

    items = _items(request.input)
    if not items:
        raise DataError("input must not be empty", field="input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise DataError(f"input holds more than {MAX_EMBEDDING_INPUTS} items", field="input")
    tokenizer = embedder.bundle.tokenizer
    vocab = len(tokenizer)
    texts = []
    for item in items:
        if isinstance(item, str):
            text = item
        else:
            if any(t >= vocab for t in item):
                raise DataError(f"token ids must be below {vocab}", field="input")
            text = str(tokenizer.decode(item, skip_special_tokens=True))
        if not text:
            raise DataError("input must not hold an empty string", field="input")
        texts.append(text)
    return texts


def _items(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A prompt or input as its items: texts, or token id lists (one list of ids is one)."""
    if isinstance(value, str):
        return [value]
    items: list[str | list[int]] = []
    for item in value:
        if isinstance(item, int):
            return [[int(t) for t in value if isinstance(t, int)]]
        items.append(item)
    return items


def _encoded(row: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return [float(v) for v in row]


# ---- streaming --------------------------------------------------------------------------


@dataclass
class SSEAnswer:
    """The chunks of a streamed answer (SSE lines) and the sequences behind them.

    :meth:`cancel` (the client went away) ends every sequence at the engine's next
    step; :meth:`aclose` ends the chunks too. The chunks cancel the sequences
    themselves however their iteration ends.
    """

    streams: list[SequenceStream]
    chunks: AsyncGenerator[str, None]

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()

    async def aclose(self) -> None:
        self.cancel()
        await self.chunks.aclose()


def _answer(streams: list[SequenceStream], chunks: AsyncIterator[str]) -> SSEAnswer:
    async def guarded() -> AsyncGenerator[str, None]:
        try:
            async for line in chunks:
                yield line
        finally:
            for stream in streams:
                stream.cancel()

    return SSEAnswer(streams, guarded())


async def _merged(streams: list[SequenceStream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """The events of every stream as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    events: asyncio.Queue[tuple[int, TokenEvent | Exception]] = asyncio.Queue()

    async def pump(i: int, stream: SequenceStream) -> None:
        try:
            async for event in stream:
                await events.put((i, event))
        except Exception as exc:  # a failed choice: its reader hears it (not a silent task)
            await events.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        finished = 0
        while finished < len(streams):
            i, got = await events.get()
            if isinstance(got, Exception):
                raise got
            if got.finish_reason is not None:
                finished += 1
            yield i, got
    finally:
        for task in tasks:
            task.cancel()


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


# ---- shared ----------------------------------------------------------------------------


def _refuse_unsupported(request: ChatCompletionRequest | CompletionRequest) -> None:
    if request.logit_bias:
        raise DataError("logit_bias is not supported", field="logit_bias")
    if request.stream_options is not None and not request.stream:
        raise DataError("stream_options is only allowed with stream: true", field="stream_options")


def _plan(
    lm: LanguageModel,
    prompts: list[list[int]],
    request: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
    prompt_field: str,
    max_field: str,
    json_schema: str | None = None,
    logprobs: int | None = None,
    logprobs_field: str = "logprobs",
) -> _Plan:
    """SamplingParams per choice, within the model's context (see the module docstring)."""
    bundle = lm.bundle
    extra = request.stop_strings() or []
    stop = list(dict.fromkeys([*bundle.generation.stop, *(s for s in extra if s)]))
    base = replace(
        bundle.params(
            max_new_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=stop,
        ),
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        json_schema=json_schema,
        logprobs=logprobs,
    )
    try:
        check_params(base)
        check_processing(base)
    except DataError as exc:
        raise DataError(exc.message, field=_field(exc.field, max_field, logprobs_field)) from None
    context = model_context(lm)
    choices = []
    for p, ids in enumerate(prompts):
        if context is not None and len(ids) >= context:
            raise DataError(
                f"the prompt has {len(ids)} tokens and the model's context is {context}: "
                "no room for a completion",
                field=prompt_field,
            )
        fitted = within_context(base, len(ids), context)
        for j in range(request.n):
            i = p * request.n + j
            seed = None if base.seed is None else base.seed + i
            choices.append((p, replace(fitted, seed=seed)))
    return _Plan(prompts, choices, max_field, logprobs_field)


def _field(field: str | None, max_field: str, logprobs_field: str) -> str | None:
    """A SamplingParams field as the request names it."""
    names = {
        "max_new_tokens": max_field,
        "json_schema": "response_format",
        "logprobs": logprobs_field,
    }
    return names.get(field or "", field)


def model_context(lm: LanguageModel) -> int | None:
    """The model's context in tokens (prompt + completion), as its generator knows it."""
    generator = lm.engine.generator
    for name in ("context", "context_length"):
        value = getattr(generator, name, None)
        if isinstance(value, int):
            return value
    return lm.bundle.max_length


def _submit(engine: GenerationEngine, plan: _Plan) -> list[SequenceStream]:
    """Every choice's sequence, or none: a refusal (QueueFull, or a DataError over the
    engine's KV budget) cancels those submitted. A metered request (its route's
    :func:`kiln.monitor.token_meter.current`) is checked against the tokens quota first
    (QuotaError, 429) and its sequences are counted as they generate."""
    use = token_meter.current()
    if use is not None:
        use.admit([len(ids) for ids in plan.prompts], [c.max_new_tokens for _, c in plan.choices])
    streams: list[SequenceStream] = []
    try:
        for p, params in plan.choices:
            if use is not None:  # a stream stops where the quota does
                params = replace(params, max_new_tokens=use.budget(params.max_new_tokens))
            streams.append(engine.submit(plan.prompts[p], params))
    except BaseException as exc:
        for stream in streams:
            stream.cancel()
        if use is not None:  # nothing ran: the refused request (a 503 retried) is not billed
            use.refused()
        if isinstance(exc, DataError) and exc.field in ("max_new_tokens", "json_schema"):
            field = _field(exc.field, plan.max_field, plan.logprobs_field)
            raise DataError(exc.message, field=field) from None
        raise
    return streams if use is None else use.watch(streams)


async def _collect_all(
    streams: list[SequenceStream],
) -> list[tuple[str, TokenEvent, list[TokenLogprob]]]:
    """Every stream's text, last event and logprob records; cancelled all if this is
    (a caller gone)."""

    async def collect(stream: SequenceStream) -> tuple[str, TokenEvent, list[TokenLogprob]]:
        parts: list[str] = []
        records: list[TokenLogprob] = []
        last: TokenEvent | None = None
        async for event in stream:
            parts.append(event.text)
            records.extend(event.logprobs)
            last = event
        assert last is not None  # a stream ends with its finish event
        return "".join(parts), last, records

    try:
        return list(await asyncio.gather(*(collect(s) for s in streams)))
    finally:
        for stream in streams:
            stream.cancel()  # a no-op for a finished one


def _finish(event: TokenEvent) -> FinishReason:
    # "cancelled" only follows a cancel by this request, whose caller is gone; should a
    # server shutdown cut one short, it ended before its own stop: "length"
    return "stop" if event.finish_reason == "stop" else "length"


def _usage(plan: _Plan, lasts: list[TokenEvent]) -> Usage:
    prompt = sum(len(ids) for ids in plan.prompts)
    completion = sum(e.completion_tokens for e in lasts)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
