"""Token metering: tokens held and counted in memory, written in batches per (deployment,
key); the ``tokens`` quota refuses at the door and stops a stream at the limit.

The sequences are a real :class:`~kiln.serve.engine.GenerationEngine` over a tiny
random Llama; the database is a real migrated SQLite file."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from transformers import PreTrainedTokenizerFast

from kiln.errors import QuotaError
from kiln.monitor import token_meter, usage
from kiln.monitor.metering import PredictionMeter
from kiln.monitor.metrics import LLMMetrics
from kiln.monitor.token_meter import ServedBy, TokenUse
from kiln.runtime.generation import SamplingParams, TorchGenerator
from kiln.serve.engine import GenerationEngine, SequenceStream, TokenEvent
from kiln.store.db import Database
from kiln.store.projects import ensure_project
from kiln.store.tables import UsageEvent
from support import tiny_bpe, tiny_llama

T = TypeVar("T")
NO_EOS = (9999,)  # an id the vocabulary lacks: only max_new_tokens ends a sequence


class NoDatabase:
    """Stands in for the database where none may be touched (the serving path)."""

    def session(self) -> Any:
        raise AssertionError("the serving path touched the database")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_bpe()


@pytest.fixture(scope="module")
def gen(tok: PreTrainedTokenizerFast) -> TorchGenerator:
    return TorchGenerator(tiny_llama(tok, initializer_range=0.5), tok)


@pytest.fixture
def pid(db: Database) -> int:
    with db.session() as s:
        return ensure_project(s, "default").id


def run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(make(), timeout=60))


REGISTRIES: dict[int, CollectorRegistry] = {}


def _metrics() -> LLMMetrics:
    registry = CollectorRegistry()
    metrics = LLMMetrics(registry)
    REGISTRIES[id(metrics)] = registry
    return metrics


def _by(pid: int, deployment: str = "chat", key: str | None = "k1") -> ServedBy:
    return ServedBy(pid, "default", deployment, 1, key)


def _value(metrics: LLMMetrics, name: str, labels: tuple[str, str, str]) -> float | None:
    """A sample of ``metrics``' registry, as a scrape reads it."""
    project, deployment, version = labels
    return REGISTRIES[id(metrics)].get_sample_value(
        name, {"project": project, "deployment": deployment, "version": version}
    )


def _events(db: Database) -> list[tuple[str, str, str | None, float]]:
    with db.session() as s:
        rows = s.scalars(select(UsageEvent).order_by(UsageEvent.id)).all()
        return sorted((e.kind, e.subject, e.key_id, e.quantity) for e in rows)


def test_tokens_are_written_in_batches_per_deployment_and_key(db: Database, pid: int) -> None:
    async def scenario() -> None:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        meter.db = NoDatabase()  # type: ignore[assignment]
        for deployment, key, prompt, completion in [
            ("chat", "k1", 10, 5),
            ("chat", "k1", 3, 2),
            ("chat", "k2", 7, 1),
            ("embed", None, 4, 0),
        ]:
            meter.reserve_tokens(pid, prompt)
            meter.hold_tokens(pid, completion)
            meter.commit_tokens(pid, deployment, key, prompt, completion)
        meter.reserve_tokens(pid, 100)
        meter.hold_tokens(pid, -100)  # a request that never ran: its hold goes
        assert meter.pending_tokens(pid) == 32
        meter.db = db
        await meter.flush()
        assert meter.pending_tokens(pid) == 0
        await meter.flush()  # nothing new: nothing written twice

    run(scenario)
    assert _events(db) == [
        ("completion_tokens", "chat", "k1", 7.0),
        ("completion_tokens", "chat", "k2", 1.0),
        ("prompt_tokens", "chat", "k1", 13.0),
        ("prompt_tokens", "chat", "k2", 7.0),
        ("prompt_tokens", "embed", None, 4.0),
    ]
    with db.session() as s:
        by_key = usage.summary(s, pid, start=None, end=None, group_by="total", by=["key"])
        assert usage.used(s, pid, "tokens", None) == 32
    keys = {(i["kind"], i["key"]): i["quantity"] for i in by_key["items"]}
    assert keys == {
        ("completion_tokens", "k1"): 7,
        ("completion_tokens", "k2"): 1,
        ("prompt_tokens", "k1"): 13,
        ("prompt_tokens", "k2"): 7,
        ("prompt_tokens", ""): 4,
    }


def test_an_unwritten_batch_is_kept_when_the_database_fails(db: Database, pid: int) -> None:
    async def scenario() -> None:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        meter.reserve_tokens(pid, 6)
        meter.commit_tokens(pid, "chat", "k1", 6, 0)
        meter.db = NoDatabase()  # type: ignore[assignment]
        await meter.flush()  # fails: the counts wait
        assert meter.pending_tokens(pid) == 6
        meter.reserve_tokens(pid, 1)
        meter.commit_tokens(pid, "chat", "k1", 1, 0)
        meter.db = db
        await meter.flush()
        assert meter.pending_tokens(pid) == 0

    run(scenario)
    assert _events(db) == [("prompt_tokens", "chat", "k1", 7.0)]


def test_a_request_reserves_prompt_and_max_tokens_and_records_what_it_used(
    db: Database, pid: int, gen: TorchGenerator, tok: PreTrainedTokenizerFast
) -> None:
    prompt = list(tok("hello world")["input_ids"])
    params = SamplingParams(max_new_tokens=6, eos_ids=NO_EOS)
    metrics = _metrics()

    async def scenario() -> None:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        engine = GenerationEngine(gen)
        try:
            use = TokenUse(meter, metrics, _by(pid), streamed=False)
            use.admit([len(prompt)], [params.max_new_tokens, params.max_new_tokens])
            # two choices of one prompt: the prompt once, max_tokens twice
            assert meter.pending_tokens(pid) == len(prompt) + 12
            streams = use.watch([engine.submit(prompt, params), engine.submit(prompt, params)])
            lasts = [await _last(s) for s in streams]
            assert [e.completion_tokens for e in lasts] == [6, 6]
            assert meter.pending_tokens(pid) == len(prompt) + 12  # still the reservation
            use.settle()
            use.settle()  # idempotent
            assert meter.pending_tokens(pid) == len(prompt) + 12  # now what it used
            await meter.flush()
        finally:
            await engine.close()

    run(scenario)
    assert _events(db) == [
        ("completion_tokens", "chat", "k1", 12.0),
        ("prompt_tokens", "chat", "k1", float(len(prompt))),
    ]
    labels = ("default", "chat", "1")
    assert _value(metrics, "kiln_llm_prompt_tokens_total", labels) == len(prompt)
    assert _value(metrics, "kiln_llm_completion_tokens_total", labels) == 12
    assert _value(metrics, "kiln_llm_time_to_first_token_seconds_count", labels) == 2
    # 5 gaps after each sequence's first token
    assert _value(metrics, "kiln_llm_inter_token_latency_seconds_count", labels) == 10


async def _last(stream: SequenceStream) -> TokenEvent:
    last = None
    async for event in stream:
        last = event
    assert last is not None
    return last


def test_the_tokens_quota_refuses_at_the_door(db: Database, pid: int) -> None:
    with db.session() as s:
        usage.set_quota(s, pid, "tokens", "day", 100)
        usage.record(s, pid, "prompt_tokens", 60, subject="chat")
        usage.record(s, pid, "completion_tokens", 30, subject="chat")

    async def scenario() -> None:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        metrics = _metrics()
        # unstreamed: prompt + max_tokens must fit (90 + 4 + 8 > 100)
        unstreamed = TokenUse(meter, metrics, _by(pid), streamed=False)
        with pytest.raises(QuotaError) as refused:
            unstreamed.admit([4], [8])
        assert refused.value.field == "tokens"
        assert "tokens per day is 100; 90 used, this needs 12 more" in refused.value.message
        assert meter.pending_tokens(pid) == 0  # a refusal holds nothing
        # streamed: only the prompt must fit
        streamed = TokenUse(meter, metrics, _by(pid), streamed=True)
        streamed.admit([4], [8])
        assert meter.pending_tokens(pid) == 4
        assert meter.tokens_left(pid) == 6
        assert streamed.budget(8) == 6 and streamed.budget(5) == 5  # cut to what is left
        assert unstreamed.budget(8) == 8  # its reservation covers max_tokens
        # a concurrent request sees the hold: 94 + 7 > 100
        with pytest.raises(QuotaError, match="94 used, this needs 7 more"):
            TokenUse(meter, metrics, _by(pid), streamed=True).admit([7], [1])
        streamed.settle()
        # an embeddings request is refused only once the limit is reached
        meter.hold_tokens(pid, 6)
        with pytest.raises(QuotaError, match="tokens per day is 100; 100 used"):
            TokenUse(meter, metrics, _by(pid), streamed=True).admit([0], [])

    run(scenario)


def _stream_to_the_quota(
    db: Database, pid: int, gen: TorchGenerator, prompt: list[int], choices: int
) -> tuple[list[TokenEvent], TokenUse]:
    """One streamed request of ``choices`` x 40 tokens, as kiln.serve.openai submits it."""
    params = SamplingParams(max_new_tokens=40, eos_ids=NO_EOS)

    async def scenario() -> tuple[list[TokenEvent], TokenUse]:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        engine = GenerationEngine(gen)
        try:
            use = TokenUse(meter, _metrics(), _by(pid), streamed=True)
            use.admit([len(prompt)], [40] * choices)
            submitted = []
            for _ in range(choices):
                fitted = replace(params, max_new_tokens=use.budget(params.max_new_tokens))
                submitted.append(engine.submit(prompt, fitted))
            streams = use.watch(submitted)
            lasts = await asyncio.gather(*(_last(s) for s in streams))
            use.settle()
            await meter.flush()
            return lasts, use
        finally:
            await engine.close()

    return run(scenario)


def test_a_stream_stops_exactly_at_the_quota(
    db: Database, pid: int, gen: TorchGenerator, tok: PreTrainedTokenizerFast
) -> None:
    prompt = list(tok("hello world")["input_ids"])
    with db.session() as s:
        usage.set_quota(s, pid, "tokens", "total", len(prompt) + 10)  # 10 of the 40 fit

    (last,), use = _stream_to_the_quota(db, pid, gen, prompt, choices=1)
    # the engine stopped it at the quota: max_new_tokens was cut to what was left
    assert last.finish_reason == "length" and last.completion_tokens == 10
    assert use.stopped is not None and use.stopped.field == "tokens"
    error = use.error_event()
    assert error is not None
    problem = json.loads(error.removeprefix("data: "))["error"]
    assert problem["code"] == "insufficient_quota" and problem["param"] == "tokens"
    assert problem["message"].startswith("quota exceeded: tokens in total is")
    with db.session() as s:
        assert usage.used(s, pid, "tokens", None) == len(prompt) + 10


def test_every_choice_of_a_stream_stops_when_together_they_reach_the_quota(
    db: Database, pid: int, gen: TorchGenerator, tok: PreTrainedTokenizerFast
) -> None:
    prompt = list(tok("hello world")["input_ids"])
    with db.session() as s:
        usage.set_quota(s, pid, "tokens", "total", len(prompt) + 10)

    lasts, use = _stream_to_the_quota(db, pid, gen, prompt, choices=2)
    # both were cancelled once their sum reached 10: "length", not the engine's
    # "cancelled"; each alone could have gone on to 10
    assert [e.finish_reason for e in lasts] == ["length", "length"]
    generated = sum(e.completion_tokens for e in lasts)
    assert 10 <= generated <= 20
    assert use.completion == generated and use.error_event() is not None
    with db.session() as s:
        assert usage.used(s, pid, "tokens", None) == len(prompt) + generated


def test_a_stream_that_ends_within_the_quota_sends_no_error(
    db: Database, pid: int, gen: TorchGenerator, tok: PreTrainedTokenizerFast
) -> None:
    prompt = list(tok("hello world")["input_ids"])
    with db.session() as s:
        usage.set_quota(s, pid, "tokens", "day", 1000)
    params = SamplingParams(max_new_tokens=5, eos_ids=NO_EOS)

    async def scenario() -> tuple[TokenEvent, TokenUse]:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        engine = GenerationEngine(gen)
        try:
            use = TokenUse(meter, _metrics(), _by(pid), streamed=True)
            use.admit([len(prompt)], [5])
            (stream,) = use.watch([engine.submit(prompt, params)])
            last = await _last(stream)
            use.settle()
            return last, use
        finally:
            await engine.close()

    last, use = run(scenario)
    assert last.finish_reason == "length" and last.completion_tokens == 5
    assert use.stopped is None and use.error_event() is None


def test_the_engine_gauges_follow_its_steps(
    gen: TorchGenerator, tok: PreTrainedTokenizerFast
) -> None:
    metrics = _metrics()
    labels = ("default", "chat", "1")
    prompt = list(tok("hello world")["input_ids"])
    # the gauge as the engine's own hook sees it, right after the gauges were set: the
    # events reach the event loop later, when a tiny model may already be done
    running: list[float | None] = []

    def after_gauges(_stats: object) -> None:
        running.append(_value(metrics, "kiln_llm_running_sequences", labels))

    async def scenario() -> None:
        engine = GenerationEngine(gen, max_num_seqs=2, on_step=after_gauges)
        try:
            token_meter.watch_engine(engine, metrics, labels)
            token_meter.watch_engine(engine, metrics, labels)  # once is enough
            budget = _value(metrics, "kiln_llm_kv_cache_budget_tokens", labels)
            assert budget == engine.kv_budget
            stream = engine.submit(prompt, SamplingParams(max_new_tokens=8, eos_ids=NO_EOS))
            async for _ in stream:
                pass
            assert max(r or 0.0 for r in running) == 1
        finally:
            await engine.close()

    run(scenario)
    assert running  # the hook that was set before still hears every step
    assert _value(metrics, "kiln_llm_running_sequences", labels) == 0
    assert _value(metrics, "kiln_llm_kv_cache_tokens", labels) == 0
