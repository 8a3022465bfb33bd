"""The generation engine a server runs for one loaded language model.

Requests come from the event loop (:meth:`GenerationEngine.submit`) and get a
:class:`SequenceStream`: an async iterator of :class:`TokenEvent` (text deltas with
their token counts, the last one carrying ``finish_reason``). Decoding runs on the
engine's own thread, never on the event loop. :meth:`SequenceStream.cancel` (a client
that went away) frees the sequence's slot at the next step.

:class:`GenerationEngine` batches continuously (iteration-level): a scheduler thread
admits waiting sequences between decode steps, up to ``max_num_seqs`` and a KV-cache
budget (``kv_budget_tokens``; a sequence reserves its prompt + ``max_new_tokens``),
runs one step of a :class:`~kiln.runtime.batch_decode.BatchDecoder` (long prompts are
prefilled in chunks between the running rows' steps), passes every new token through
the sequence's own :class:`~kiln.runtime.generation.TextDecoder` (stop strings, eos,
UTF-8-safe deltas) and drops finished, cancelled and past-deadline sequences at once.

Admission is bounded: at most ``max_num_seqs`` sequences decode at once and at most
``max_queue`` wait; past that :meth:`~GenerationEngine.submit` raises
:class:`~kiln.errors.QueueFull` (503 with ``Retry-After``). A sequence past its
``deadline`` ends with ``finish_reason`` ``"length"`` and what it produced so far.

Per-sequence logits processing (``SamplingParams`` penalties, ``json_schema``,
``logprobs``; see :mod:`kiln.runtime.logits_processing`) happens in the batch decoder;
a grammar that admits no further token ends its sequence with ``"stop"``, and each
event carries the logprob records of the tokens it covers (:attr:`TokenEvent.logprobs`).
:class:`SequentialEngine` is the one-at-a-time baseline with the same interface (for
benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kiln.errors import DataError, QueueFull
from kiln.runtime.batch_decode import BatchDecoder, batch_decoder_for
from kiln.runtime.generation import Generator, SamplingParams, TextDecoder
from kiln.runtime.logits_processing import TokenLogprob, needs_processing

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class TokenEvent:
    """What one step gave a sequence: ``text`` (possibly empty: a held-back tail) and
    the tokens generated so far; ``finish_reason`` on the sequence's last event.
    ``first_token_s`` is seconds from submission to the first token. ``logprobs``
    (when the params ask for them) holds one record per token generated since the
    previous event, in order (a token whose text was held back comes with the event
    that streams it; an end-of-sequence token has none)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    first_token_s: float | None = None  # set on the first event that carries a token
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class EngineStats:
    """The engine right now: sequences decoding and waiting, and KV-cache use in
    tokens (prompt + generated of the running sequences) against its budget."""

    running: int
    waiting: int
    kv_tokens: int
    kv_budget: int | None


@dataclass
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None  # time.monotonic() seconds
    events: asyncio.Queue[TokenEvent | BaseException]
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)
    wake: Callable[[], None] = lambda: None  # nudges the scheduler (a cancel)
    submitted: float = field(default_factory=time.perf_counter)

    def emit(self, event: TokenEvent | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


class SequenceStream(AsyncIterator[TokenEvent]):
    """The events of one submitted sequence; ends after the event with a finish reason.
    A backend failure is raised from the iteration."""

    def __init__(self, seq: _Sequence) -> None:
        self._seq = seq
        self._done = False

    def __aiter__(self) -> SequenceStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._seq.events.get()
        if isinstance(event, BaseException):
            self._done = True
            raise event
        if event.finish_reason is not None:
            self._done = True
        return event

    def cancel(self) -> None:
        """Stop generating this sequence; its slot is free at the next step."""
        self._seq.cancelled.set()
        self._seq.wake()


@dataclass
class _Live:
    """A sequence admitted to the decoder: its text side and its KV reservation."""

    seq: _Sequence
    text: TextDecoder
    reserved: int  # prompt + max_new_tokens, in KV tokens
    first_token_s: float | None = None
    pending: list[TokenLogprob] = field(default_factory=list)  # not yet in an event

    def event(self, delta: str, finish: FinishReason | None = None) -> TokenEvent:
        records, self.pending = tuple(self.pending), []
        return TokenEvent(
            delta,
            self.text.prompt_tokens,
            len(self.text.token_ids),
            finish,
            self.first_token_s,
            records,
        )


class GenerationEngine:
    """Continuous batching of a :class:`~kiln.runtime.generation.Generator`'s model for
    concurrent requests (see the module docstring). ``kv_budget_tokens`` defaults to the
    model's context x ``max_num_seqs`` (None, unbounded, for a model without one);
    ``on_step`` is called on the scheduler thread with the stats after every step (and
    when cancellations or deadlines leave the engine idle)."""

    def __init__(
        self,
        generator: Generator,
        *,
        max_num_seqs: int = 8,
        max_queue: int = 64,
        kv_budget_tokens: int | None = None,
        prefill_chunk: int = 256,
        on_step: Callable[[EngineStats], None] | None = None,
    ) -> None:
        if max_num_seqs < 1:
            raise DataError("max_num_seqs must be at least 1", field="max_num_seqs")
        self.generator = generator
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.decoder: BatchDecoder = batch_decoder_for(generator, prefill_chunk=prefill_chunk)
        context = self.decoder.context
        if kv_budget_tokens is None and context is not None:
            kv_budget_tokens = context * max_num_seqs
        self.kv_budget = kv_budget_tokens
        self.on_step = on_step
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()  # guarded by _cond
        self._live: dict[int, _Live] = {}  # the scheduler thread's own
        self._stats = EngineStats(0, 0, 0, self.kv_budget)
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="kiln-generate", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        deadline: float | None = None,
    ) -> SequenceStream:
        """Queue one sequence (call from the event loop); QueueFull when full, DataError
        (naming the field) for a prompt or parameters the model cannot serve.
        ``deadline`` is a ``time.monotonic()`` instant."""
        prompt = [int(t) for t in prompt_ids]
        params = self.decoder.prepare(prompt, params)
        if self.kv_budget is not None and len(prompt) + params.max_new_tokens > self.kv_budget:
            raise DataError(
                f"prompt + max_new_tokens ({len(prompt) + params.max_new_tokens} tokens) "
                f"exceed the KV-cache budget of {self.kv_budget}",
                field="max_new_tokens",
            )
        seq = _Sequence(prompt, params, deadline, asyncio.Queue(), asyncio.get_running_loop())
        seq.wake = self._wake
        with self._cond:
            if self._closed:
                raise QueueFull("the model is shutting down; retry shortly")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting for this model")
            self._waiting.append(seq)
            self._cond.notify()
        return SequenceStream(seq)

    def stats(self) -> EngineStats:
        """As of the last step (running and KV use), with the waiting count now."""
        with self._cond:
            waiting = len(self._waiting)
        s = self._stats
        return EngineStats(s.running, waiting, s.kv_tokens, s.kv_budget)

    async def close(self) -> None:
        """Finish what is running and waiting, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    # -- the scheduler thread ----------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _work(self) -> None:
        while True:
            try:
                if not self._iterate():
                    return
            except Exception as exc:  # the thread must live on: every running stream hears
                self._fail_all(exc)

    def _iterate(self) -> bool:
        """One scheduling round: sweep, admit, start, step; False once closed and drained."""
        if self._sweep() and not self._live:
            self._publish()  # the engine goes idle: its stats must say so now
        admitted = self._admit()  # after the sweep: a freed slot goes to a waiting one
        if admitted is None:
            return False
        for seq in admitted:
            self._start(seq)
        if self.decoder.active():
            try:
                self._step()
            except Exception as exc:  # the backend failed: every running stream hears
                self._fail_all(exc)
        self._publish()
        return True

    def _admit(self) -> list[_Sequence] | None:
        """Wait for work; take waiting sequences that fit (FIFO, up to max_num_seqs and
        the KV budget; the first always fits an empty engine). Cancelled or expired
        waiting sequences end here. None once closed and drained."""
        with self._cond:
            while not self._waiting and not self._live:
                if self._closed:
                    return None
                self._cond.wait()
            now = time.monotonic()
            for seq in [s for s in self._waiting if s.cancelled.is_set() or s.expired(now)]:
                self._waiting.remove(seq)
                reason: FinishReason = "cancelled" if seq.cancelled.is_set() else "length"
                seq.emit(TokenEvent("", len(seq.prompt_ids), 0, reason))
            reserved = sum(live.reserved for live in self._live.values())
            taken: list[_Sequence] = []
            while self._waiting and len(self._live) + len(taken) < self.max_num_seqs:
                need = _reservation(self._waiting[0])
                if self.kv_budget is not None and reserved + need > self.kv_budget:
                    break
                reserved += need
                taken.append(self._waiting.popleft())
            return taken

    def _start(self, seq: _Sequence) -> None:
        """Begin decoding ``seq``; if the backend refuses it, that stream alone hears why."""
        seq_id = next(self._ids)
        try:
            text = self.decoder.text_decoder(seq.prompt_ids, seq.params)
            self.decoder.add(seq_id, seq.prompt_ids, seq.params)
        except Exception as exc:
            with contextlib.suppress(Exception):
                self.decoder.remove(seq_id)
            seq.emit(exc)
            return
        self._live[seq_id] = _Live(seq, text, _reservation(seq))

    def _sweep(self) -> bool:
        """End cancelled and past-deadline sequences before the next step; whether any."""
        now = time.monotonic()
        ended = False
        for seq_id, live in list(self._live.items()):
            if live.seq.cancelled.is_set():
                self._end(seq_id, live.event("", "cancelled"))
            elif live.seq.expired(now):
                self._end(seq_id, live.event(live.text.end("length"), "length"))
            else:
                continue
            ended = True
        return ended

    def _step(self) -> None:
        tokens = self.decoder.step()
        records = self.decoder.logprobs()
        for seq_id, token in tokens:
            live = self._live.get(seq_id)
            if live is None:
                continue
            if live.first_token_s is None:
                live.first_token_s = time.perf_counter() - live.seq.submitted
            record = records.get(seq_id)
            if record is not None:
                live.pending.append(record)
            delta = live.text.push(token)
            if delta:
                live.seq.emit(live.event(delta))
            if live.text.finish is not None:
                self._end(seq_id, live.event("", live.text.finish))
        for seq_id, reason in self.decoder.ended():
            live = self._live.get(seq_id)
            if live is not None:
                delta = live.text.end(reason)
                if delta:
                    live.seq.emit(live.event(delta))
                self._end(seq_id, live.event("", reason))

    def _end(self, seq_id: int, last: TokenEvent) -> None:
        live = self._live.pop(seq_id)
        self.decoder.remove(seq_id)
        live.seq.emit(last)

    def _fail_all(self, exc: Exception) -> None:
        for seq_id, live in list(self._live.items()):
            self._live.pop(seq_id)
            with contextlib.suppress(Exception):
                self.decoder.remove(seq_id)
            live.seq.emit(exc)

    def _publish(self) -> None:
        with self._cond:
            waiting = len(self._waiting)
        self._stats = EngineStats(
            len(self._live), waiting, self.decoder.kv_tokens(), self.kv_budget
        )
        if self.on_step is not None:
            self.on_step(self._stats)


def _reservation(seq: _Sequence) -> int:
    """KV tokens a sequence may come to hold: prompt + max_new_tokens."""
    return len(seq.prompt_ids) + seq.params.max_new_tokens


class SequentialEngine:
    """The one-at-a-time baseline with :class:`GenerationEngine`'s interface: decodes one
    sequence at a time on its thread, in arrival order, with the generator's own
    ``stream`` (for benchmarks and comparisons)."""

    def __init__(
        self,
        generator: Generator,
        *,
        max_num_seqs: int = 8,
        max_queue: int = 64,
    ) -> None:
        self.generator = generator
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self._waiting: queue.Queue[_Sequence | None] = queue.Queue()
        self._running = 0
        self._kv_tokens = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="kiln-generate", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        deadline: float | None = None,
    ) -> SequenceStream:
        """Queue one sequence (call from the event loop); QueueFull when full. Penalties,
        a JSON schema or logprobs are a DataError: the generator's own loop has none."""
        if needs_processing(params):
            raise DataError(
                "the sequential engine samples unprocessed logits: no penalties, "
                "json_schema or logprobs",
                field="params",
            )
        if self._closed:
            raise QueueFull("the model is shutting down; retry shortly")
        if self._waiting.qsize() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting for this model")
        seq = _Sequence(
            list(prompt_ids), params, deadline, asyncio.Queue(), asyncio.get_running_loop()
        )
        self._waiting.put(seq)
        return SequenceStream(seq)

    def stats(self) -> EngineStats:
        return EngineStats(self._running, self._waiting.qsize(), self._kv_tokens, None)

    async def close(self) -> None:
        """Finish what is running and waiting, then stop the thread."""
        self._closed = True
        self._waiting.put(None)
        await asyncio.to_thread(self._thread.join)

    def _work(self) -> None:
        while True:
            seq = self._waiting.get()
            if seq is None:
                return
            self._running, self._kv_tokens = 1, len(seq.prompt_ids)
            try:
                self._decode(seq)
            except Exception as exc:  # a bad request must not kill the thread
                seq.emit(exc)
            finally:
                self._running, self._kv_tokens = 0, 0

    def _decode(self, seq: _Sequence) -> None:
        prompt_tokens = len(seq.prompt_ids)
        if seq.cancelled.is_set():
            seq.emit(TokenEvent("", prompt_tokens, 0, "cancelled"))
            return
        stream = self.generator.stream(seq.prompt_ids, seq.params)
        first: float | None = None
        produced = 0
        with contextlib.closing(stream):
            for delta in stream:
                decoded = stream.generated
                if first is None and decoded:
                    first = time.perf_counter() - seq.submitted
                produced = decoded
                self._kv_tokens = prompt_tokens + produced
                seq.emit(TokenEvent(delta, prompt_tokens, produced, first_token_s=first))
                if seq.cancelled.is_set():
                    seq.emit(TokenEvent("", prompt_tokens, produced, "cancelled"))
                    return
                if seq.expired(time.monotonic()):
                    seq.emit(TokenEvent("", prompt_tokens, produced, "length"))
                    return
        done = stream.completion
        seq.emit(TokenEvent("", prompt_tokens, done.completion_tokens, done.finish_reason, first))
