"""Review of issue #14's LLM serving (slices 1-2): regressions found in review.

Real parts throughout: a GenerationEngine over tiny random Llamas, a migrated SQLite
database behind the PredictionMeter, the service's own submit and stream helpers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry
from transformers import PreTrainedTokenizerFast

from kiln.errors import DataError, QueueFull
from kiln.monitor import token_meter
from kiln.monitor.metering import PredictionMeter
from kiln.monitor.metrics import LLMMetrics
from kiln.monitor.token_meter import ServedBy, TokenUse
from kiln.runtime.generation import SamplingParams, TorchGenerator
from kiln.runtime.logits_processing import json_schema_text
from kiln.serve import openai as service
from kiln.serve.engine import GenerationEngine
from kiln.store.db import Database
from kiln.store.projects import ensure_project
from support import tiny_bpe, tiny_llama

T = TypeVar("T")
NO_EOS = (9999,)  # an id the vocabulary lacks: only max_new_tokens ends a sequence
SCHEMA = json_schema_text({"type": "object"})


def run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(make(), timeout=60))


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return tiny_bpe()


@pytest.fixture(scope="module")
def gen(bpe: PreTrainedTokenizerFast) -> TorchGenerator:
    return TorchGenerator(tiny_llama(bpe), bpe)


@pytest.fixture(scope="module")
def word_gen() -> TorchGenerator:
    """A model whose (fast) tokenizer is WordLevel: llguidance cannot read it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["hello", "world", "the", "a", "b", "c", "{", "}", ":", ",", '"']
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    return TorchGenerator(tiny_llama(tok), tok)


@pytest.fixture
def pid(db: Database) -> int:
    with db.session() as s:
        return ensure_project(s, "default").id


def _use(meter: PredictionMeter, pid: int, *, streamed: bool) -> TokenUse:
    metrics = LLMMetrics(CollectorRegistry())
    return TokenUse(meter, metrics, ServedBy(pid, "default", "chat", 1, "k1"), streamed=streamed)


def _plan(n: int = 1, **params: object) -> service._Plan:
    base = SamplingParams(max_new_tokens=4, eos_ids=NO_EOS)
    chosen = replace(base, **params)  # type: ignore[arg-type]
    return service._Plan([[5, 6, 7]], [(0, chosen)] * n, "max_tokens")


# ---- engine: one bad sequence must not kill the scheduler ---------------------------------


def test_a_grammar_the_tokenizer_cannot_take_fails_only_its_sequence(
    word_gen: TorchGenerator,
) -> None:
    """A json_schema on a model whose tokenizer llguidance cannot read (WordLevel) raised
    in the scheduler thread (decoder.add, outside any try): the thread died and every
    later request of the deployment hung. Now that one sequence fails with a DataError
    naming json_schema (a 400), and the engine goes on serving."""

    async def scenario() -> None:
        engine = GenerationEngine(word_gen, max_num_seqs=2)
        try:
            bad = engine.submit([3, 4], SamplingParams(max_new_tokens=3, json_schema=SCHEMA))
            with pytest.raises(DataError) as caught:
                async for _ in bad:
                    pass
            assert caught.value.field == "json_schema"
            good = engine.submit([3, 4], SamplingParams(max_new_tokens=3, eos_ids=NO_EOS))
            events = [e async for e in good]
            assert events[-1].finish_reason == "length"
            assert events[-1].completion_tokens == 3
        finally:
            await asyncio.wait_for(engine.close(), 20)

    run(scenario)


def test_a_failed_choice_of_a_streamed_n_request_ends_the_stream(
    word_gen: TorchGenerator,
) -> None:
    """With n > 1 the streamed chunks merge the choices in tasks; a choice whose stream
    raised (any backend failure) killed its task silently and the merge waited forever
    for its finish: the SSE response hung. The error now reaches the stream's reader."""

    async def scenario() -> None:
        engine = GenerationEngine(word_gen, max_num_seqs=2)
        try:
            params = SamplingParams(max_new_tokens=3, json_schema=SCHEMA)
            streams = [engine.submit([3, 4], params) for _ in range(2)]
            with pytest.raises(DataError):
                async for _ in service._merged(streams):
                    pass
        finally:
            await asyncio.wait_for(engine.close(), 20)

    run(scenario)


# ---- metering: a refused request uses no tokens ----------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
def test_a_request_the_engine_refuses_is_not_billed(
    db: Database, pid: int, gen: TorchGenerator, streamed: bool
) -> None:
    """A request whose sequences the engine refused (QueueFull: a 503 the openai client
    retries twice) was billed its prompt tokens each time: admit() set the prompt and
    settle() committed it though nothing ran."""

    async def scenario() -> float:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        engine = GenerationEngine(gen, max_queue=0)  # every submit: QueueFull
        try:
            use = _use(meter, pid, streamed=streamed)
            plan = _plan()
            if streamed:

                def start() -> service.SSEAnswer:
                    streams = service._submit(engine, plan)
                    return service._answer(streams, _nothing())

                with pytest.raises(QueueFull):
                    token_meter.streamed(use, start)
            else:

                async def answer() -> None:
                    service._submit(engine, plan)

                with pytest.raises(QueueFull):
                    await token_meter.answered(use, answer())
            await meter.flush()
            return meter.pending_tokens(pid)
        finally:
            await asyncio.wait_for(engine.close(), 20)

    assert run(scenario) == 0
    from sqlalchemy import select

    from kiln.store.tables import UsageEvent

    with db.session() as s:
        assert s.scalars(select(UsageEvent)).all() == []


async def _nothing() -> AsyncIterator[str]:
    """An answer's chunks that end at once."""
    empty: tuple[str, ...] = ()
    for line in empty:
        yield line


def test_a_stream_closed_before_its_first_chunk_releases_its_hold(
    db: Database, pid: int, gen: TorchGenerator
) -> None:
    """EventStream closes the answer (aclose) however the response ends; when that
    happens before the first chunk (the response start could not be sent), the metered
    chunks' generator had never started, so its finally (settle) never ran: the
    prompt's hold stayed in the meter for good, eating the project's tokens quota."""

    async def scenario() -> float:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        engine = GenerationEngine(gen, max_num_seqs=2)
        try:
            use = _use(meter, pid, streamed=True)
            plan = _plan()

            def start() -> service.SSEAnswer:
                streams = service._submit(engine, plan)
                return service._answer(streams, _nothing())

            answer = token_meter.streamed(use, start)
            await answer.aclose()  # as EventStream's finally, before any chunk
            await meter.flush()
            return meter.pending_tokens(pid)
        finally:
            await asyncio.wait_for(engine.close(), 20)

    assert run(scenario) == 0


# ---- /v1 bodies: a seed past the documented bound is a 400, not a crash -------------------


def test_a_seed_past_its_bound_is_refused_and_bounded_seeds_run(gen: TorchGenerator) -> None:
    """``seed`` took any int; torch's generators take 64 bits, so ``seed: 2**70`` with a
    temperature raised in the scheduler thread (a 500, or before the engine guarded
    _start a dead engine). It is now refused by the schema (a 400 naming ``seed``) past
    +-(2^53 - 1) (a bound the OpenAPI document states exactly), and the largest seed runs, its
    n = 8 choices' ``seed + i`` included."""
    from pydantic import ValidationError

    from kiln.serve.openai_schemas import MAX_N, ChatCompletionRequest

    messages = [{"role": "user", "content": "hi"}]
    for seed in (2**53, -(2**53), 2**63, 2**70):
        with pytest.raises(ValidationError) as caught:
            ChatCompletionRequest.model_validate({"model": "m", "messages": messages, "seed": seed})
        assert caught.value.errors()[0]["loc"] == ("seed",)

    async def scenario() -> list[int]:
        engine = GenerationEngine(gen, max_num_seqs=MAX_N)
        try:
            top = ChatCompletionRequest.model_validate(
                {"model": "m", "messages": messages, "seed": 2**53 - 1}
            ).seed
            assert top is not None
            lasts = []
            for seed in (top + MAX_N - 1, -(2**53 - 1)):
                params = SamplingParams(
                    max_new_tokens=2, temperature=1.0, seed=seed, eos_ids=NO_EOS
                )
                lasts.append([e async for e in engine.submit([5, 6], params)][-1])
            return [e.completion_tokens for e in lasts]
        finally:
            await asyncio.wait_for(engine.close(), 20)

    assert run(scenario) == [2, 2]


def test_a_completion_asking_for_too_many_sequences_is_a_bad_request() -> None:
    """5000 prompts are not a full queue (503, which clients retry): they are a 400."""
    from kiln.errors import DataError
    from kiln.serve.openai import completion_prompts
    from kiln.serve.openai_schemas import MAX_SEQUENCES, CompletionRequest

    request = CompletionRequest.model_validate(
        {"model": "m", "prompt": ["hello"] * (MAX_SEQUENCES + 1)}
    )
    with pytest.raises(DataError) as refused:
        completion_prompts(None, request)  # type: ignore[arg-type]  # refused before the model
    assert refused.value.field == "prompt"


def test_bodies_refused_before_routing_answer_in_openais_shape_on_v1(tmp_path: Path) -> None:
    """413 (the body limit) and 422 (NUL in text) are answered by middleware before any
    route runs; on /v1 they still come in OpenAI's shape, which its client reads."""
    from fastapi.testclient import TestClient

    from kiln.app import create_app
    from kiln.settings import Settings

    with TestClient(create_app(Settings(home=tmp_path / "home"))) as client:
        _refused_in_both_shapes(client)


def _refused_in_both_shapes(client: Any) -> None:
    nul = client.post(
        "/v1/chat/completions",
        content=b'{"model": "m\\u0000", "messages": []}',
        headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
    )
    assert nul.status_code == 400 and set(nul.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    big = client.post(
        "/v1/chat/completions",
        content=b"x" * (9 << 20),
        headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
    )
    assert big.status_code == 413 and big.json()["error"]["param"] == "body"
    kiln_shape = client.post(
        "/api/v1/jobs",
        content=b"x" * (9 << 20),
        headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
    )
    assert kiln_shape.status_code == 413 and kiln_shape.json()["error"]["field"] == "body"
