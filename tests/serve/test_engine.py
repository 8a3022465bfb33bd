"""Continuous batching: the batched decoders and the GenerationEngine scheduler.

The model is a tiny random Llama with large initial weights (initializer_range 0.5), so
its greedy output depends on the whole context (a default-init tiny model repeats one
token, which would hide a broken cache merge). Solo references are
``TorchGenerator.generate([prompt], params)``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from transformers import PreTrainedTokenizerFast

from kiln.errors import DataError, QueueFull
from kiln.runtime.batch_decode import GenaiBatchDecoder, TorchBatchDecoder
from kiln.runtime.generation import Completion, SamplingParams, TorchGenerator
from kiln.serve.engine import EngineStats, GenerationEngine, SequenceStream, TokenEvent
from support import async_wait_for, tiny_bpe, tiny_llama

T = TypeVar("T")
NO_EOS = (9999,)  # an id the vocabulary lacks: only max_new_tokens ends a sequence
TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog again and again and again",
    "a",
    "one two three four five six",
    "chat with me",
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_bpe()


@pytest.fixture(scope="module")
def gen(tok: PreTrainedTokenizerFast) -> TorchGenerator:
    return TorchGenerator(tiny_llama(tok, initializer_range=0.5), tok)


@pytest.fixture(scope="module")
def prompts(tok: PreTrainedTokenizerFast) -> list[list[int]]:
    rows = [list(tok(t)["input_ids"]) for t in TEXTS]
    assert len({len(r) for r in rows}) == len(rows)  # all different lengths
    return rows


def solo(gen: TorchGenerator, prompt: list[int], params: SamplingParams) -> Completion:
    return gen.generate([prompt], params)[0]


def run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(make(), timeout=60))


async def drain(stream: SequenceStream) -> tuple[str, list[TokenEvent]]:
    events = [e async for e in stream]
    assert events[-1].finish_reason is not None
    assert all(e.finish_reason is None for e in events[:-1])
    return "".join(e.text for e in events), events


class Steps:
    """Every step's stats, recorded by the engine's on_step hook (scheduler thread)."""

    def __init__(self) -> None:
        self.seen: list[EngineStats] = []
        self._lock = threading.Lock()

    def __call__(self, stats: EngineStats) -> None:
        with self._lock:
            self.seen.append(stats)

    def count(self) -> int:
        with self._lock:
            return len(self.seen)


# -- the decoders ------------------------------------------------------------------------


def drive(
    decoder: TorchBatchDecoder | GenaiBatchDecoder,
    prompts: list[list[int]],
    params: SamplingParams,
    join_at: list[int],
) -> dict[int, list[int]]:
    """Step ``decoder``, adding prompt i at step join_at[i] and removing a sequence once
    it has max_new_tokens; every sequence's token ids."""
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    step = 0
    while step <= max(join_at) or decoder.active():
        for i, at in enumerate(join_at):
            if at == step:
                decoder.add(i, prompts[i], decoder.prepare(prompts[i], params))
        for seq_id, token in decoder.step():
            got[seq_id].append(token)
            if len(got[seq_id]) == params.max_new_tokens:
                decoder.remove(seq_id)
        step += 1
        assert step < 1000
    return got


@pytest.mark.parametrize("chunk", [256, 3])
def test_torch_batch_greedy_equals_solo(
    gen: TorchGenerator, prompts: list[list[int]], chunk: int
) -> None:
    # prompts of different lengths join while others are mid-generation; with chunk 3
    # the long prompts are prefilled over several steps between the others' decode steps
    params = SamplingParams(max_new_tokens=24, eos_ids=NO_EOS)
    want = [solo(gen, p, params).token_ids for p in prompts]
    assert len({tuple(w) for w in want}) == len(want)
    decoder = TorchBatchDecoder(gen.model, gen.tokenizer, prefill_chunk=chunk)
    got = drive(decoder, prompts, params, join_at=[0, 3, 5, 5, 20])
    assert [got[i] for i in range(len(prompts))] == want
    assert decoder.active() == 0 and decoder.kv_tokens() == 0


def test_torch_batch_cache_accounting(gen: TorchGenerator, prompts: list[list[int]]) -> None:
    decoder = TorchBatchDecoder(gen.model, gen.tokenizer, prefill_chunk=4)
    params = SamplingParams(max_new_tokens=50, eos_ids=NO_EOS)
    long, short = prompts[1], prompts[2]
    decoder.add(0, long, params)
    assert decoder.step() == []  # 4 of the long prompt's tokens in: no token yet
    assert decoder.active() == 1 and decoder.kv_tokens() == 4
    while not decoder.step():
        pass
    decoder.add(1, short, params)
    assert [s for s, _ in decoder.step()] == [0, 1]  # the short one joins the step
    # the long row decoded once more, the short one holds its prompt only
    assert decoder.kv_tokens() == (len(long) + 1) + len(short)
    decoder.remove(0)
    # the columns that were padding for the short row alone are gone
    assert decoder._mask.shape == (1, len(short))
    assert decoder.kv_tokens() == len(short)
    with pytest.raises(DataError):
        decoder.add(1, short, params)


def test_torch_batch_seeded_sampling_equals_solo(
    gen: TorchGenerator, prompts: list[list[int]]
) -> None:
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7, eos_ids=NO_EOS)
    want = [solo(gen, p, params).token_ids for p in prompts]
    decoder = TorchBatchDecoder(gen.model, gen.tokenizer)
    assert [v for _, v in sorted(drive(decoder, prompts, params, [0, 1, 2, 2, 4]).items())] == want


@pytest.fixture(scope="module")
def genai_model(tmp_path_factory: pytest.TempPathFactory, tok: PreTrainedTokenizerFast) -> Path:
    """A genai folder of a tiny Llama (head size 16: onnxruntime's GQA kernel needs a
    multiple of 16); built in well under a second."""
    pytest.importorskip("onnxruntime_genai")
    from kiln.runtime.genai import build_genai

    model = tiny_llama(tok, initializer_range=0.5, hidden_size=64, num_key_value_heads=4)
    root = tmp_path_factory.mktemp("genai")
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    build_genai(root / "hf", root / "genai", precision="fp32")
    return root


def test_genai_batch_greedy_equals_solo(
    genai_model: Path, tok: PreTrainedTokenizerFast, prompts: list[list[int]]
) -> None:
    from transformers import LlamaForCausalLM

    from kiln.runtime.genai import GenaiGenerator

    torch_gen = TorchGenerator(LlamaForCausalLM.from_pretrained(genai_model / "hf"), tok)
    generator = GenaiGenerator(genai_model / "genai", tok)
    params = SamplingParams(max_new_tokens=20, eos_ids=NO_EOS)
    want = [solo(torch_gen, p, params).token_ids for p in prompts]
    # the folder's eos (id 1) always ends a genai sequence: cut the references there
    want = [w[: w.index(1) + 1] if 1 in w else w for w in want]
    decoder = GenaiBatchDecoder(generator)
    got = drive(decoder, prompts, params, join_at=[0, 2, 4, 4, 9])
    assert [got[i][: len(w)] for i, w in enumerate(want)] == want
    assert decoder.active() == sum(len(got[i]) < params.max_new_tokens for i in got)
    for i in list(got):
        decoder.remove(i)
    assert decoder.active() == 0 and decoder.kv_tokens() == 0
    with pytest.raises(DataError, match="seed"):
        decoder.prepare(prompts[0], SamplingParams(temperature=1.0, seed=1))


def test_the_engine_serves_a_genai_model_from_its_own_thread(
    genai_model: Path, tok: PreTrainedTokenizerFast, prompts: list[list[int]]
) -> None:
    """onnxruntime-genai answers an Engine only on the thread that created it: the
    engine is built on the event loop's thread and decodes on its scheduler thread."""
    from kiln.runtime.genai import GenaiGenerator

    generator = GenaiGenerator(genai_model / "genai", tok)
    params = SamplingParams(max_new_tokens=12, eos_ids=NO_EOS)
    want = [generator.generate([p], params)[0].text for p in prompts[:3]]

    async def main() -> list[tuple[str, list[TokenEvent]]]:
        engine = GenerationEngine(generator, max_num_seqs=4)
        try:
            streams = [engine.submit(p, params) for p in prompts[:3]]
            return await asyncio.gather(*(drain(s) for s in streams))
        finally:
            await engine.close()

    assert [text for text, _ in run(main)] == want


def test_a_sequence_the_backend_refuses_fails_alone(
    gen: TorchGenerator, prompts: list[list[int]]
) -> None:
    """A backend error while a sequence starts reaches that stream; the engine lives on."""
    params = SamplingParams(max_new_tokens=6, eos_ids=NO_EOS)

    async def main() -> tuple[str, str]:
        engine = GenerationEngine(gen, max_num_seqs=4)
        add = engine.decoder.add
        refused = prompts[0]

        def failing_add(seq_id: int, prompt_ids: list[int], p: SamplingParams) -> None:
            if prompt_ids == refused:
                raise RuntimeError("the backend refused this prompt")
            add(seq_id, prompt_ids, p)

        engine.decoder.add = failing_add  # type: ignore[method-assign]
        try:
            bad = engine.submit(refused, params)
            with pytest.raises(RuntimeError, match="refused"):
                await drain(bad)
            good, _ = await drain(engine.submit(prompts[1], params))
            return good, solo(gen, prompts[1], params).text
        finally:
            await engine.close()

    got, want = run(main)
    assert got == want


# -- the engine --------------------------------------------------------------------------


def test_engine_greedy_equals_solo(gen: TorchGenerator, prompts: list[list[int]]) -> None:
    params = SamplingParams(max_new_tokens=24, eos_ids=NO_EOS)
    want = [solo(gen, p, params) for p in prompts]
    steps = Steps()

    async def main() -> list[tuple[str, list[TokenEvent]]]:
        engine = GenerationEngine(gen, max_num_seqs=8, on_step=steps)
        try:
            streams = [engine.submit(p, params) for p in prompts]
            return await asyncio.gather(*(drain(s) for s in streams))
        finally:
            await engine.close()

    results = run(main)
    assert [text for text, _ in results] == [w.text for w in want]
    for (_, events), w in zip(results, want, strict=True):
        last = events[-1]
        assert (last.finish_reason, last.completion_tokens) == ("length", 24)
        assert last.prompt_tokens == w.prompt_tokens
        assert last.first_token_s is not None and last.first_token_s > 0
    assert max(s.running for s in steps.seen) == len(prompts)  # decoded as one batch
    # the whole batch needed about max_new_tokens steps, not len(prompts) times that
    assert steps.count() < 24 + len(prompts) + 5


def test_sequence_joins_mid_generation(gen: TorchGenerator, prompts: list[list[int]]) -> None:
    first = SamplingParams(max_new_tokens=60, eos_ids=NO_EOS)
    second = SamplingParams(max_new_tokens=20, eos_ids=NO_EOS)
    steps = Steps()

    async def main() -> tuple[str, str, int]:
        engine = GenerationEngine(gen, max_num_seqs=4, on_step=steps)
        try:
            a = engine.submit(prompts[1], first)
            head = await a.__anext__()  # a is decoding
            joined_at = head.completion_tokens
            b = engine.submit(prompts[3], second)
            (rest_a, events_a), (text_b, _) = await asyncio.gather(drain(a), drain(b))
            assert events_a[-1].completion_tokens == 60
            return head.text + rest_a, text_b, joined_at
        finally:
            await engine.close()

    text_a, text_b, joined_at = run(main)
    assert joined_at < 60
    assert text_a == solo(gen, prompts[1], first).text
    assert text_b == solo(gen, prompts[3], second).text
    assert any(s.running == 2 for s in steps.seen)


def test_cancel_frees_the_slot_at_the_next_step(
    gen: TorchGenerator, prompts: list[list[int]]
) -> None:
    long = SamplingParams(max_new_tokens=120, eos_ids=NO_EOS)
    short = SamplingParams(max_new_tokens=5, eos_ids=NO_EOS)
    steps = Steps()

    async def main() -> tuple[int, int, list[TokenEvent], str]:
        engine = GenerationEngine(gen, max_num_seqs=1, on_step=steps)
        try:
            a = engine.submit(prompts[0], long)
            await a.__anext__()
            b = engine.submit(prompts[2], short)  # waits: the only slot is a's
            at = steps.count()
            a.cancel()
            _, events_a = await drain(a)
            text_b, _ = await drain(b)
            return at, steps.count(), events_a, text_b
        finally:
            await engine.close()

    at, _, events_a, text_b = run(main)
    assert events_a[-1].finish_reason == "cancelled"
    assert events_a[-1].completion_tokens < 120
    assert text_b == solo(gen, prompts[2], short).text
    # b was admitted (nothing waiting, one running) within two steps of the cancel:
    # the step in flight when it came, then the next
    admitted = next(i for i, s in enumerate(steps.seen) if i >= at and s.waiting == 0)
    assert admitted <= at + 2
    assert steps.seen[admitted].running == 1


def test_queue_bound_raises_queue_full(gen: TorchGenerator, prompts: list[list[int]]) -> None:
    long = SamplingParams(max_new_tokens=100, eos_ids=NO_EOS)

    async def main() -> None:
        engine = GenerationEngine(gen, max_num_seqs=1, max_queue=1)
        try:
            a = engine.submit(prompts[0], long)
            await a.__anext__()  # a holds the slot
            b = engine.submit(prompts[2], long)  # the queue's one place
            assert engine.stats().waiting == 1
            with pytest.raises(QueueFull) as refused:
                engine.submit(prompts[2], long)
            assert refused.value.http_status == 503 and refused.value.retry_after >= 1
            a.cancel()
            b.cancel()
            assert (await drain(a))[1][-1].finish_reason == "cancelled"
            assert (await drain(b))[1][-1].finish_reason == "cancelled"
            # the engine is idle at once and its stats say so (no step ran after the cancel)
            idle = EngineStats(running=0, waiting=0, kv_tokens=0, kv_budget=engine.kv_budget)
            await async_wait_for(lambda: engine.stats() == idle, timeout=2)
        finally:
            await engine.close()

    run(main)


def test_deadline_ends_with_length(gen: TorchGenerator, prompts: list[list[int]]) -> None:
    params = SamplingParams(max_new_tokens=120, eos_ids=NO_EOS)

    async def main() -> tuple[list[TokenEvent], list[TokenEvent]]:
        engine = GenerationEngine(gen, max_num_seqs=2)
        try:
            soon = engine.submit(prompts[0], params, deadline=time.monotonic() + 0.05)
            past = engine.submit(prompts[2], params, deadline=time.monotonic() - 1)
            (_, a), (_, b) = await asyncio.gather(drain(soon), drain(past))
            return a, b
        finally:
            await engine.close()

    soon, past = run(main)
    assert soon[-1].finish_reason == "length" and soon[-1].completion_tokens < 120
    assert past[-1].finish_reason == "length" and past[-1].completion_tokens == 0


def test_stop_string_and_eos_give_stop(gen: TorchGenerator, prompts: list[list[int]]) -> None:
    free = solo(gen, prompts[3], SamplingParams(max_new_tokens=30, eos_ids=NO_EOS))
    stop_at = free.text[len(free.text) // 2 :][:2]
    assert stop_at.strip()
    by_stop = SamplingParams(max_new_tokens=30, stop=(stop_at,), eos_ids=NO_EOS)
    by_eos = SamplingParams(max_new_tokens=30, eos_ids=(free.token_ids[6],))
    want_stop, want_eos = solo(gen, prompts[3], by_stop), solo(gen, prompts[3], by_eos)
    assert want_stop.finish_reason == want_eos.finish_reason == "stop"

    async def main() -> list[tuple[str, list[TokenEvent]]]:
        engine = GenerationEngine(gen)
        try:
            streams = [engine.submit(prompts[3], p) for p in (by_stop, by_eos)]
            streams.append(engine.submit(prompts[0], by_stop))  # a batch-mate
            return await asyncio.gather(*(drain(s) for s in streams))
        finally:
            await engine.close()

    (text_s, ev_s), (text_e, ev_e), _ = run(main)
    assert (text_s, ev_s[-1].finish_reason) == (want_stop.text, "stop")
    assert stop_at not in text_s
    assert ev_s[-1].completion_tokens == want_stop.completion_tokens
    assert (text_e, ev_e[-1].finish_reason) == (want_eos.text, "stop")
    assert ev_e[-1].completion_tokens == want_eos.completion_tokens <= 7


def test_seeded_sampling_reproducible(gen: TorchGenerator, prompts: list[list[int]]) -> None:
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=3, eos_ids=NO_EOS)
    other = SamplingParams(max_new_tokens=20, temperature=1.0, seed=4, eos_ids=NO_EOS)

    async def main() -> list[str]:
        engine = GenerationEngine(gen)
        try:
            streams = [
                engine.submit(prompts[1], params),
                engine.submit(prompts[0], other),
                engine.submit(prompts[1], params),
            ]
            return [text for text, _ in await asyncio.gather(*(drain(s) for s in streams))]
        finally:
            await engine.close()

    first, mate, again = run(main)
    assert first == again == solo(gen, prompts[1], params).text
    assert mate == solo(gen, prompts[0], other).text
    assert first != solo(gen, prompts[1], SamplingParams(max_new_tokens=20, eos_ids=NO_EOS)).text


def test_concurrent_consumers_and_kv_budget(gen: TorchGenerator, prompts: list[list[int]]) -> None:
    params = SamplingParams(max_new_tokens=12, eos_ids=NO_EOS)
    # prompts of the long one's length, less 0-2 tokens: room for two at once, never
    # three; the budget, not max_num_seqs, bounds the batch
    rows = [prompts[1][: len(prompts[1]) - i % 3] for i in range(8)]
    budget = 2 * (max(len(r) for r in rows) + 12)
    steps = Steps()

    async def consume(engine: GenerationEngine, row: list[int], delay: float) -> str:
        await asyncio.sleep(delay)
        text, _ = await drain(engine.submit(row, params))
        return text

    async def main() -> list[str]:
        engine = GenerationEngine(gen, max_num_seqs=8, kv_budget_tokens=budget, on_step=steps)
        try:
            with pytest.raises(DataError) as too_big:
                engine.submit(rows[0], SamplingParams(max_new_tokens=budget))
            assert too_big.value.field == "max_new_tokens"
            return await asyncio.gather(
                *(consume(engine, r, 0.002 * i) for i, r in enumerate(rows))
            )
        finally:
            await engine.close()

    texts = run(main)
    assert texts == [solo(gen, r, params).text for r in rows]
    assert max(s.running for s in steps.seen) == 2
    assert all(s.kv_tokens <= budget and s.kv_budget == budget for s in steps.seen)
    assert steps.seen[-1].running == 0 and steps.seen[-1].kv_tokens == 0


def test_bad_request_is_refused_at_submit(gen: TorchGenerator) -> None:
    async def main() -> None:
        engine = GenerationEngine(gen)
        try:
            with pytest.raises(DataError):
                engine.submit([], SamplingParams())
            with pytest.raises(DataError):
                engine.submit([5] * 500, SamplingParams())  # past the 128-token context
            assert engine.kv_budget == 128 * 8
        finally:
            await engine.close()

    run(main)
