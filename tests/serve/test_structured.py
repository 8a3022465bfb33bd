"""Per-sequence logits processing in the serving engine: JSON-schema decoding
(llguidance), OpenAI's presence/frequency penalties and logprobs.

The models are tiny random Llamas: they know nothing of JSON, so every well-formed
answer is the grammar's doing. Sequences run through the real GenerationEngine
(continuous batching), next to unprocessed ones where it matters.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from kiln.errors import DataError
from kiln.runtime.batch_decode import GenaiBatchDecoder, TorchBatchDecoder
from kiln.runtime.generation import SamplingParams, TorchGenerator
from kiln.runtime.logits_processing import (
    SequenceProcessor,
    TokenBridge,
    TokenLogprob,
    apply_penalties,
    check_json_schema,
    json_schema_text,
)
from kiln.serve.engine import GenerationEngine, SequentialEngine, TokenEvent
from support import tiny_bpe, tiny_llama

T = TypeVar("T")
NO_EOS = (9999,)  # an id the vocabulary lacks: only max_new_tokens ends a sequence
SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "count": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "count", "color"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_bpe()


@pytest.fixture(scope="module")
def prompt(tok: PreTrainedTokenizerFast) -> list[int]:
    return list(tok("hello world")["input_ids"])


@pytest.fixture(scope="module")
def plain(tok: PreTrainedTokenizerFast) -> TorchGenerator:
    """A default-init random Llama (near-uniform logits) with room for long answers."""
    return TorchGenerator(tiny_llama(tok, max_position_embeddings=512), tok)


@pytest.fixture(scope="module")
def sharp(tok: PreTrainedTokenizerFast) -> TorchGenerator:
    """Large initial weights: peaked logits, so greedy output depends on the context."""
    return TorchGenerator(tiny_llama(tok, initializer_range=0.5), tok)


@pytest.fixture(scope="module")
def closer(tok: PreTrainedTokenizerFast) -> TorchGenerator:
    """A random Llama whose output head adds +4 to every token holding ``"``, ``}`` or
    ``]``: free JSON (any object) then ends in a few dozen tokens instead of running on
    in endless strings. The model still knows no JSON: unconstrained it writes junk."""
    model = tiny_llama(tok, tie_word_embeddings=False, max_position_embeddings=256)
    head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        for text, i in tok.get_vocab().items():
            if any(c in text for c in '"}]'):
                head.bias[i] = 4.0
    model.lm_head = head
    return TorchGenerator(model, tok)


def assert_matches(value: object) -> None:
    """``value`` is valid under :data:`SCHEMA` (checked by hand: exact keys, types, the
    string's length, the enum)."""
    assert isinstance(value, dict) and set(value) == {"name", "count", "color"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert type(value["count"]) is int
    assert value["color"] in ("red", "green", "blue")


def run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(make(), timeout=60))


def generate(
    gen: TorchGenerator, prompt: list[int], params: list[SamplingParams]
) -> list[tuple[str, list[TokenEvent]]]:
    """Every params' sequence, submitted together to one engine: (text, events)."""

    async def main() -> list[tuple[str, list[TokenEvent]]]:
        engine = GenerationEngine(gen, max_num_seqs=8)
        try:
            streams = [engine.submit(prompt, p) for p in params]

            async def drain(i: int) -> tuple[str, list[TokenEvent]]:
                events = [e async for e in streams[i]]
                return "".join(e.text for e in events), events

            return list(await asyncio.gather(*(drain(i) for i in range(len(streams)))))
        finally:
            await engine.close()

    return run(main)


# -- penalties ---------------------------------------------------------------------------


def test_penalties_follow_openais_formula(tok: PreTrainedTokenizerFast) -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    out = apply_penalties(logits, counts, presence=0.5, frequency=0.25)
    # logits[t] - c[t] * freq - (c[t] > 0) * pres
    assert out.tolist() == [1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 4.0]
    # a negative penalty favours repeats
    assert apply_penalties(logits, counts, -1.0, 0.0).tolist() == [1.0, 3.0, 4.0, 4.0]

    # the processor counts generated tokens and applies the same formula
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    proc = SequenceProcessor(params, TokenBridge(tok, frozenset({1})))
    row = torch.zeros(len(tok))
    assert torch.equal(proc.process(row), row)  # nothing generated yet
    for token in (5, 7, 7):
        proc.accept(token, proc.process(row))
    got = proc.process(row)
    assert got[5].item() == pytest.approx(-0.75) and got[7].item() == pytest.approx(-1.0)
    assert got[6].item() == 0.0


def test_frequency_penalty_reduces_repeats_on_the_model(
    sharp: TorchGenerator, prompt: list[int]
) -> None:
    base = SamplingParams(max_new_tokens=40, eos_ids=NO_EOS)
    runs = decode(
        sharp,
        prompt,
        [base, replace(base, frequency_penalty=2.0), replace(base, presence_penalty=0.0)],
    )
    free, penalised, zero = (ids for ids, _ in runs)
    assert free == zero == sharp.generate([prompt], base)[0].token_ids  # 0: the model's own
    assert max(Counter(penalised).values()) < max(Counter(free).values())
    assert len(set(penalised)) > len(set(free))  # more distinct tokens


def decode(
    gen: TorchGenerator, prompt: list[int], params: list[SamplingParams]
) -> list[tuple[list[int], list[TokenLogprob | None]]]:
    """Token ids and logprob records per sequence, decoded together on one
    TorchBatchDecoder until each reaches max_new_tokens or its grammar ends it."""
    decoder = TorchBatchDecoder(gen.model, gen.tokenizer)
    out: list[tuple[list[int], list[TokenLogprob | None]]] = [([], []) for _ in params]
    for i, p in enumerate(params):
        decoder.add(i, prompt, decoder.prepare(prompt, p))
    while decoder.active():
        tokens = decoder.step()
        records = decoder.logprobs()
        for i, token in tokens:
            out[i][0].append(token)
            out[i][1].append(records.get(i))
            if len(out[i][0]) >= params[i].max_new_tokens:
                decoder.remove(i)
        for i, _ in decoder.ended():
            decoder.remove(i)
    return out


# -- logprobs ----------------------------------------------------------------------------


def test_logprobs_equal_log_softmax_of_the_models_logits(
    sharp: TorchGenerator, prompt: list[int]
) -> None:
    params = SamplingParams(max_new_tokens=12, eos_ids=NO_EOS, logprobs=3)
    (ids, records), (plain_ids, plain_records) = decode(
        sharp, prompt, [params, replace(params, logprobs=None)]
    )
    assert ids == plain_ids == sharp.generate([prompt], replace(params, logprobs=None))[0].token_ids
    assert plain_records == [None] * len(ids)
    with torch.inference_mode():  # one forward pass over prompt + answer
        logits = sharp.model(input_ids=torch.tensor([prompt + ids])).logits[0]
    want = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)  # (N, V)
    bridge = TokenBridge(sharp.tokenizer, frozenset())
    for step, (token, record) in enumerate(zip(ids, records, strict=True)):
        assert record is not None
        assert record.logprob == pytest.approx(want[step, token].item(), abs=1e-4)
        assert record.bytes == bridge.token_bytes(token)
        top_values, top_ids = want[step].topk(3)
        assert [t.bytes for t in record.top] == [bridge.token_bytes(int(i)) for i in top_ids]
        assert [t.logprob for t in record.top] == pytest.approx(top_values.tolist(), abs=1e-4)
        assert record.top[0].logprob == pytest.approx(record.logprob)  # greedy: the best


def test_engine_events_carry_one_record_per_token(sharp: TorchGenerator, prompt: list[int]) -> None:
    params = SamplingParams(max_new_tokens=10, eos_ids=NO_EOS, logprobs=0)
    [(text, events)] = generate(sharp, prompt, [params])
    records = [r for e in events for r in e.logprobs]
    assert len(records) == events[-1].completion_tokens == 10
    assert all(r.top == () for r in records)
    assert text == sharp.generate([prompt], replace(params, logprobs=None))[0].text


# -- JSON ----------------------------------------------------------------------------------


def test_json_object_parses_for_five_seeds(closer: TorchGenerator, prompt: list[int]) -> None:
    schema = json_schema_text({"type": "object"})
    params = [
        SamplingParams(max_new_tokens=200, temperature=1.0, seed=s, json_schema=schema)
        for s in range(5)
    ]
    free = SamplingParams(max_new_tokens=30, temperature=1.0, seed=0, eos_ids=NO_EOS)
    *answers, (junk, _) = generate(closer, prompt, [*params, free])
    for text, events in answers:
        assert events[-1].finish_reason == "stop", text  # the grammar ended it
        assert isinstance(json.loads(text), dict)
    assert len({text for text, _ in answers}) > 1  # really sampled
    with pytest.raises(json.JSONDecodeError):  # the same model without the grammar
        json.loads(junk)


def test_json_schema_output_validates(plain: TorchGenerator, prompt: list[int]) -> None:
    schema = json_schema_text(SCHEMA)
    params = [
        SamplingParams(max_new_tokens=150, temperature=1.0, seed=s, json_schema=schema)
        for s in range(5)
    ]
    greedy = SamplingParams(max_new_tokens=20, eos_ids=NO_EOS)
    *answers, (plain_text, _) = generate(plain, prompt, [*params, greedy])
    for text, events in answers:
        assert events[-1].finish_reason == "stop", text
        value = json.loads(text)
        assert_matches(value)
        assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # compact
    assert len({json.loads(t)["color"] for t, _ in answers}) > 1
    # an unconstrained row batched with grammar rows is the model's own greedy answer
    assert plain_text == plain.generate([prompt], greedy)[0].text


def test_max_tokens_cuts_json_with_length(plain: TorchGenerator, prompt: list[int]) -> None:
    params = SamplingParams(max_new_tokens=3, temperature=1.0, seed=0)
    [(text, events)] = generate(
        plain, prompt, [replace(params, json_schema=json_schema_text(SCHEMA))]
    )
    assert events[-1].finish_reason == "length" and text.startswith('{"')


def test_bad_schemas_and_ranges_are_refused(plain: TorchGenerator, prompt: list[int]) -> None:
    for bad in ('{"type": "wrong"}', '{"type": '):
        with pytest.raises(DataError) as err:
            check_json_schema(bad)
        assert err.value.field == "json_schema"
    decoder = TorchBatchDecoder(plain.model, plain.tokenizer)
    for params, field in (
        (SamplingParams(json_schema='{"type": "wrong"}'), "json_schema"),
        (SamplingParams(presence_penalty=2.5), "presence_penalty"),
        (SamplingParams(frequency_penalty=-3.0), "frequency_penalty"),
        (SamplingParams(logprobs=21), "logprobs"),
    ):
        with pytest.raises(DataError) as err:
            decoder.prepare(prompt, params)
        assert err.value.field == field

    async def sequential() -> None:
        engine = SequentialEngine(plain)
        try:
            with pytest.raises(DataError):
                engine.submit(prompt, SamplingParams(logprobs=1))
        finally:
            await engine.close()

    run(sequential)


# -- onnxruntime-genai ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def genai_folder(tmp_path_factory: pytest.TempPathFactory, tok: PreTrainedTokenizerFast) -> Path:
    pytest.importorskip("onnxruntime_genai")
    from kiln.runtime.genai import build_genai

    model = tiny_llama(tok, hidden_size=64, num_key_value_heads=4, max_position_embeddings=512)
    root = tmp_path_factory.mktemp("genai")
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    build_genai(root / "hf", root / "genai", precision="fp32")
    return root / "genai"


def test_genai_enforces_the_schema_and_refuses_penalties_and_logprobs(
    genai_folder: Path, tok: PreTrainedTokenizerFast, prompt: list[int]
) -> None:
    from kiln.runtime.genai import GenaiGenerator

    # greedy: a bounded integer, or the model would write digits until max_tokens
    schema = json.loads(json.dumps(SCHEMA))
    schema["properties"]["count"] = {"type": "integer", "minimum": 0, "maximum": 99}
    decoder = GenaiBatchDecoder(GenaiGenerator(genai_folder, tok))
    params = decoder.prepare(
        prompt, SamplingParams(max_new_tokens=150, json_schema=json_schema_text(schema))
    )
    text = decoder.text_decoder(prompt, params)
    decoder.add(0, prompt, params)
    while not text.done:
        for _, token in decoder.step():
            text.push(token)
        for _, reason in decoder.ended():
            text.end(reason)
    done = text.completion()
    assert done.finish_reason == "stop", done.text
    value = json.loads(done.text)
    assert_matches(value)
    assert 0 <= value["count"] <= 99
    for bad, field in (
        (SamplingParams(presence_penalty=0.5), "presence_penalty"),
        (SamplingParams(frequency_penalty=0.5), "frequency_penalty"),
        (SamplingParams(logprobs=0), "logprobs"),
    ):
        with pytest.raises(DataError) as err:
            decoder.prepare(prompt, bad)
        assert err.value.field == field
