"""Token metering of the ``/v1`` routes: usage per (project, deployment, key), the
``tokens`` quota, and the language-model Prometheus series.

One :class:`TokenUse` follows one request. The route makes it (after :func:`prepare`
read the project's quotas if they were not cached) and runs the service inside
:func:`answered`, :func:`streamed` or :func:`embedded`, which make it the request's
current use; :func:`kiln.serve.openai._submit` hands it the request's sequences
(:meth:`TokenUse.admit`, :meth:`TokenUse.budget`, :meth:`TokenUse.watch`), and the use
counts what they generate. What it counts goes to the deployment manager's meter
(:class:`~kiln.monitor.metering.PredictionMeter`), which writes ``prompt_tokens`` and
``completion_tokens`` usage events in batches with the prediction counts. The key is
the API key's id (kiln key ids are strings); None for a dashboard session or
``kiln serve``'s own key.

The ``tokens`` quota (prompt + completion, per day, month or in total):

- A request whose prompt tokens, added to what the project used (written, counted,
  and held by requests in flight), pass a limit is refused: QuotaError, a 429 naming
  the quota (``openai.RateLimitError`` for the client).
- A non-streamed request holds prompt + ``max_tokens`` of every choice up front, so
  it is refused when that does not fit (lower ``max_tokens`` to pass); once answered
  its hold becomes the tokens it really used.
- A streamed request holds its prompt, and each token as it is generated. Each
  choice's ``max_tokens`` is cut to what the quota leaves when it is submitted (at
  least 1), so the engine stops a lone stream exactly there; when the project's usage
  reaches a limit (several choices or requests together), every sequence of the request
  is cancelled, at the engine's next step. A choice cut either way still gets its chunk
  with ``finish_reason`` ``"length"``, then the usage chunk (with
  ``stream_options.include_usage``, counting every token generated), then one
  ``data: {"error": {"message", "type": "rate_limit_error", "param": "tokens",
  "code": "insufficient_quota"}}`` event (the shape and code of the 429), then
  ``data: [DONE]``. The official client raises ``openai.APIError`` at that event, after
  yielding every chunk before it. Concurrent streams may pass the limit by what the
  engine generates before the cancel reaches it.
- An embeddings request is refused once the quota is reached; its input tokens count
  as prompt tokens when it is answered (they are known only then).

The series (:class:`~kiln.monitor.metrics.LLMMetrics`): time to first token (the
engine's ``first_token_s``), inter-token latency (between a sequence's tokens as the
server reads them: k tokens that arrive together after dt count k gaps of dt / k),
prompt and completion token counters, and the engine gauges set by its ``on_step``
hook (:func:`watch_engine`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar, cast

from kiln.errors import QuotaError
from kiln.monitor.metering import PredictionMeter
from kiln.monitor.metrics import LLMMetrics

log = logging.getLogger("kiln.monitor")

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
STATIC_KEY = "static"
"""The key id of ``kiln serve``'s single key (``kiln.services.STATIC_PRINCIPAL``)."""

_current: ContextVar[TokenUse | None] = ContextVar("kiln_token_use", default=None)


# ---- what is metered, as this module reads it (kiln.serve.engine's types; monitor/
# must not import serve/, which imports monitor/) ------------------------------------------


class Event(Protocol):
    """One event of a sequence (:class:`kiln.serve.engine.TokenEvent`, a frozen
    dataclass: a cut sequence's last event is copied with ``dataclasses.replace``)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def completion_tokens(self) -> int: ...
    @property
    def finish_reason(self) -> Literal["stop", "length", "cancelled"] | None: ...
    @property
    def first_token_s(self) -> float | None: ...


E = TypeVar("E", bound=Event)


class Stream(Protocol[E]):
    """A submitted sequence (:class:`kiln.serve.engine.SequenceStream`)."""

    def __aiter__(self) -> Stream[E]: ...
    async def __anext__(self) -> E: ...
    def cancel(self) -> None: ...


S = TypeVar("S", bound=Stream[Any])


class Stats(Protocol):
    """An engine's stats (:class:`kiln.serve.engine.EngineStats`)."""

    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def kv_tokens(self) -> int: ...
    @property
    def kv_budget(self) -> int | None: ...


St = TypeVar("St", bound=Stats)


class PromptUsage(Protocol):
    @property
    def prompt_tokens(self) -> int: ...


class Embedded(Protocol):
    """An embeddings answer (``kiln.serve.openai_schemas.CreateEmbeddingResponse``)."""

    @property
    def usage(self) -> PromptUsage: ...


R = TypeVar("R", bound=Embedded)


def current() -> TokenUse | None:
    """The token use of the request being served, if its route meters one."""
    return _current.get()


@dataclass(frozen=True)
class ServedBy:
    """Who answers a request and for whom: the metric labels and the usage's subject."""

    project_id: int
    project: str  # the project's name (metric labels)
    deployment: str
    version: int
    key_id: str | None  # the API key's id; None for a session or kiln serve's own key

    @property
    def labels(self) -> tuple[str, str, str]:
        return (self.project, self.deployment, str(self.version))


class TokenUse:
    """The tokens of one request: checked against the ``tokens`` quota, held while it
    runs, counted in the meter once it ends (:meth:`settle`), and in the metrics as they
    come. ``streamed``: generation stops when a quota is reached (else the request
    holds prompt + max_tokens up front). See the module docstring."""

    def __init__(
        self, meter: PredictionMeter, metrics: LLMMetrics, by: ServedBy, *, streamed: bool
    ) -> None:
        self.meter = meter
        self.metrics = metrics
        self.by = by
        self.streamed = streamed
        self.prompt = 0  # tokens: every prompt once (as the response's usage counts)
        self.completion = 0  # tokens generated so far, every choice
        self.held = 0  # tokens held in the meter for this request
        self.stopped: QuotaError | None = None  # the quota that stopped generation
        self.cut = False  # a sequence was ended by that stop
        self._streams: list[MeteredStream[Any]] = []
        self._requested: list[int] = []  # each choice's max_new_tokens, as asked
        self._settled = False

    # ---- from the service (kiln.serve.openai._submit) ----------------------------------

    def admit(self, prompt_tokens: Sequence[int], max_new_tokens: Sequence[int]) -> None:
        """Check and hold a request of these prompts (token counts, once each) and
        choices (their max_new_tokens); QuotaError (429) names the quota it would pass."""
        prompt = sum(prompt_tokens)
        need = prompt if self.streamed else prompt + sum(max_new_tokens)
        self.meter.reserve_tokens(self.by.project_id, need)
        self.prompt, self.held = prompt, need

    def budget(self, max_new_tokens: int) -> int:
        """A streamed choice's ``max_new_tokens`` within what the quota leaves (at least
        1), so the engine itself stops it there; call it once per choice, in the order
        of :meth:`watch`'s streams. Unstreamed, the reservation covers it as it is."""
        self._requested.append(max_new_tokens)
        left = self.meter.tokens_left(self.by.project_id) if self.streamed else None
        if left is None or left >= max_new_tokens:
            return max_new_tokens
        return max(1, int(left))

    def refused(self) -> None:
        """The request's sequences were refused before any ran (QueueFull, the KV
        budget): it used nothing, so :meth:`settle` releases its hold and counts none."""
        self.prompt = 0

    def watch(self, streams: list[S]) -> list[S]:
        """The request's submitted sequences, counted as they generate: each one is
        wrapped in a :class:`MeteredStream`, which has a stream's whole interface
        (iteration and ``cancel``), so it stands in for the stream's type."""
        self.metrics.prompt_tokens.labels(*self.by.labels).inc(self.prompt)
        asked: list[int | None] = [*self._requested]
        asked += [None] * (len(streams) - len(asked))  # no budget asked: unknown
        self._streams = [
            MeteredStream(stream, self, n) for stream, n in zip(streams, asked, strict=True)
        ]
        return cast(list[S], list(self._streams))

    # ---- from the sequences ------------------------------------------------------------

    def generated(self, tokens: int) -> None:
        """``tokens`` more were generated; a streamed request that reaches a quota with
        them stops every sequence. Tokens after :meth:`settle` (nobody reads them) are
        not counted."""
        if self._settled:
            return
        self.completion += tokens
        self.metrics.completion_tokens.labels(*self.by.labels).inc(tokens)
        if not self.streamed:
            return  # its hold already covers max_tokens
        self.meter.hold_tokens(self.by.project_id, tokens)
        self.held += tokens
        if self.stopped is None:
            reached = self.meter.tokens_reached(self.by.project_id)
            if reached is not None:
                self.stopped = reached
                for stream in self._streams:
                    stream.cancel()

    def error_event(self) -> str | None:
        """The SSE error event of a stream the quota cut short, or None."""
        if self.stopped is None or not self.cut:
            return None
        detail = {
            "message": f"{self.stopped.message}; the answer stopped there",
            "type": "rate_limit_error",
            "param": self.stopped.field,
            "code": "insufficient_quota",
        }
        return f"data: {json.dumps({'error': detail}, separators=(',', ':'))}\n\n"

    # ---- the end --------------------------------------------------------------------

    def add_prompt(self, tokens: int) -> None:
        """Prompt tokens known only once answered (an embeddings request's input)."""
        self.prompt += tokens
        self.meter.hold_tokens(self.by.project_id, tokens)
        self.held += tokens
        self.metrics.prompt_tokens.labels(*self.by.labels).inc(tokens)

    def settle(self) -> None:
        """The request ended (answered, failed, or its client gone): its hold becomes
        the tokens it used, written at the meter's next flush (idempotent)."""
        if self._settled:
            return
        self._settled = True
        used = self.prompt + self.completion
        self.meter.hold_tokens(self.by.project_id, used - self.held)
        self.held = used
        if used:
            by = self.by
            self.meter.commit_tokens(
                by.project_id, by.deployment, by.key_id, self.prompt, self.completion
            )


class MeteredStream(Generic[E]):
    """A sequence's events as the engine sends them, counted by the request's
    :class:`TokenUse`. Once the use stopped the request for a quota, a sequence that
    ends short of the ``max_new_tokens`` it asked for was cut by it: its ``"cancelled"``
    end reads ``"length"`` (the answer is cut, not abandoned)."""

    def __init__(self, inner: Stream[E], use: TokenUse, asked: int | None = None) -> None:
        self._inner = inner
        self._use = use
        self._asked = asked  # max_new_tokens as the request asked (None: unknown)
        self._seen = 0  # completion tokens counted
        self._submitted = time.perf_counter()  # the sequence was submitted just before
        self._last: float | None = None  # perf_counter() of its previous tokens

    def __aiter__(self) -> MeteredStream[E]:
        return self

    async def __anext__(self) -> E:
        event = await self._inner.__anext__()
        self._count(event)
        if self._use.stopped is None or event.finish_reason not in ("cancelled", "length"):
            return event
        if event.finish_reason == "cancelled" or (
            self._asked is not None and event.completion_tokens < self._asked
        ):
            self._use.cut = True
        return replace(event, finish_reason="length") if self._use.cut else event

    def cancel(self) -> None:
        self._inner.cancel()

    def _count(self, event: E) -> None:
        new = event.completion_tokens - self._seen
        if new <= 0:
            return
        self._seen = event.completion_tokens
        now = time.perf_counter()
        metrics, labels = self._use.metrics, self._use.by.labels
        gaps = new  # tokens that came after an earlier one
        if self._last is None:
            first = event.first_token_s if event.first_token_s is not None else 0.0
            metrics.first_token.labels(*labels).observe(first)
            # tokens held back with the first (a partial character) came after it
            self._last, gaps = min(now, self._submitted + first), new - 1
        inter_token = metrics.inter_token.labels(*labels)
        for _ in range(gaps):  # k tokens released at once: k gaps of dt / k
            inter_token.observe((now - self._last) / gaps)
        self._last = now
        self._use.generated(new)


# ---- the route's side -------------------------------------------------------------------


async def prepare(meter: PredictionMeter, project_id: int) -> None:
    """Read the project's quotas if they are not cached (before the route picks a
    model: there must be no await between the pick and the submit)."""
    if meter.needs_load(project_id):
        await meter.prepare(project_id)


def key_of(key_id: str | None) -> str | None:
    """The key id usage names: None for kiln serve's static key."""
    return None if key_id in (None, STATIC_KEY) else key_id


@contextlib.contextmanager
def _serving(use: TokenUse) -> Iterator[None]:
    token = _current.set(use)
    try:
        yield
    finally:
        _current.reset(token)


async def answered(use: TokenUse, answer: Awaitable[T]) -> T:
    """A non-streamed answer, metered: ``answer`` (the service's coroutine) runs with
    ``use`` as the request's use, which settles however it ends."""
    with _serving(use):
        try:
            return await answer
        finally:
            use.settle()


class Answer(Protocol):
    """A streamed answer of the service (``kiln.serve.openai.SSEAnswer``)."""

    chunks: AsyncGenerator[str, None]


A = TypeVar("A", bound=Answer)


def streamed(use: TokenUse, start: Callable[[], A]) -> A:
    """A streamed answer, metered: ``start()`` (the service's stream function) checks
    and submits with ``use`` as the request's use; the answer's chunks then carry the
    quota's error event before ``[DONE]`` when the quota cut it short. ``use`` settles
    when the chunks end (or at once, if ``start()`` refuses)."""
    with _serving(use):
        try:
            answer = start()
        except BaseException:
            use.settle()
            raise
    answer.chunks = _Settling(answer.chunks, use)
    return answer


async def _lines(chunks: AsyncGenerator[str, None], use: TokenUse) -> AsyncGenerator[str, None]:
    try:
        async for line in chunks:
            if line == DONE:
                error = use.error_event()
                if error is not None:
                    yield error
            yield line
    finally:
        use.settle()
        await chunks.aclose()


class _Settling(AsyncGenerator[str, None]):
    """:func:`_lines` of ``chunks``, whose :meth:`aclose` settles ``use`` and closes
    ``chunks`` even before the first line (an async generator closed before it started
    never runs its ``finally``: the response could not start, say)."""

    def __init__(self, chunks: AsyncGenerator[str, None], use: TokenUse) -> None:
        self._chunks = chunks
        self._use = use
        self._lines = _lines(chunks, use)

    async def __anext__(self) -> str:
        return await self._lines.__anext__()

    async def asend(self, value: None) -> str:
        return await self._lines.asend(value)

    async def athrow(self, *args: Any) -> str:
        return await self._lines.athrow(*args)

    async def aclose(self) -> None:
        try:
            await self._lines.aclose()
        finally:
            self._use.settle()
            await self._chunks.aclose()


async def embedded(use: TokenUse, start: Callable[[], Awaitable[R]]) -> R:
    """An embeddings answer (``start()``: the service's call), metered: refused
    (QuotaError, 429) once the project reached a ``tokens`` quota; its input tokens
    count as prompt tokens when it is answered."""
    use.admit([0], [])
    try:
        response = await start()
        use.add_prompt(response.usage.prompt_tokens)
        return response
    finally:
        use.settle()


# ---- the engine's gauges ------------------------------------------------------------------


class Steps(Protocol[St]):
    """An engine with an ``on_step`` hook (:class:`~kiln.serve.engine.GenerationEngine`)."""

    on_step: Callable[[St], None] | None

    def stats(self) -> St: ...


class EngineGauges(Generic[St]):
    """An engine's ``on_step`` hook: sets the running / waiting / KV-cache gauges of every
    (project, deployment, version) the engine serves (on the scheduler thread; it never
    raises there). A hook that was set before is called after it."""

    def __init__(self, metrics: LLMMetrics, previous: Callable[[St], None] | None) -> None:
        self.metrics = metrics
        self.previous = previous
        self.labels: frozenset[tuple[str, str, str]] = frozenset()  # replaced, not mutated

    def __call__(self, stats: St) -> None:
        m = self.metrics
        try:
            for labels in self.labels:
                m.running.labels(*labels).set(stats.running)
                m.waiting.labels(*labels).set(stats.waiting)
                m.kv_tokens.labels(*labels).set(stats.kv_tokens)
                if stats.kv_budget is not None:
                    m.kv_budget.labels(*labels).set(stats.kv_budget)
        except Exception:  # a metrics failure must not stop the engine
            log.exception("engine gauges could not be set")
        if self.previous is not None:
            self.previous(stats)


def watch_engine(engine: Steps[St], metrics: LLMMetrics, labels: tuple[str, str, str]) -> None:
    """Report ``engine``'s stats under ``labels`` from now on (cheap when it already
    does: call it for every request)."""
    hook = engine.on_step
    if not isinstance(hook, EngineGauges) or hook.metrics is not metrics:
        hook = EngineGauges(metrics, hook)
        engine.on_step = hook
    if labels not in hook.labels:
        hook.labels = hook.labels | {labels}
        hook(engine.stats())
