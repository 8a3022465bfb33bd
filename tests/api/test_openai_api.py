"""The OpenAI-compatible routes, called with the official ``openai`` client (sync and
async) against a real uvicorn server: a tiny random Llama (chat) and a tiny random BERT
encoder, registered and deployed through kiln's own API."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from fastapi import FastAPI

from kiln.errors import DataError
from kiln.lm_bundle import EmbeddingBundle, LMBundle
from kiln.serve.lm import ServedLM
from support import serve_app, tiny_bpe, tiny_llama, wait_for

CHAT = "tiny-chat"
EMBED = "tiny-embed"
BUSY = "tiny-busy"  # one decoding slot, one waiting: easy to fill
MESSAGES: list[Any] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "hello world"},
]


@dataclass
class Server:
    url: str
    app: FastAPI
    key: str  # project default, scope predict
    reader: str  # project default, scope read only
    admin: str  # global admin key
    chat: LMBundle
    embed: EmbeddingBundle

    def client(self, key: str | None = None, project: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=key or self.key, project=project, max_retries=0
        )

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0)

    def served(self, name: str) -> ServedLM:
        return self.app.state.deployments.language_model(1, name)[2]  # type: ignore[no-any-return]


def _bundles(root: Path) -> tuple[Path, Path]:
    """A chat bundle (a random Llama with a 2048-token context: long generations) and an
    embedding bundle (a random one-layer BERT), both imported as kiln does."""
    import torch
    from transformers import BertConfig, BertModel

    from kiln.lm_workflow import import_pretrained

    tok = tiny_bpe()
    llama = root / "llama"
    tiny_llama(tok, max_position_embeddings=2048).save_pretrained(llama)
    tok.save_pretrained(llama)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    bert = root / "bert"
    BertModel(config).save_pretrained(bert)
    tok.save_pretrained(bert)
    chat = import_pretrained(str(llama), name=CHAT).save(root / "chat-bundle")
    embed = import_pretrained(str(bert), name=EMBED).save(root / "embed-bundle")
    return chat, embed


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from kiln.app import build_services, create_app
    from kiln.server import bootstrap
    from kiln.settings import Settings
    from kiln.standalone import register

    root = tmp_path_factory.mktemp("openai")
    chat_dir, embed_dir = _bundles(root)
    settings = Settings(home=root / "home")
    svc = build_services(settings)
    admin = bootstrap(svc)
    assert admin is not None
    register(svc, chat_dir, LMBundle.load(chat_dir).meta, CHAT)
    register(svc, embed_dir, EmbeddingBundle.load(embed_dir).meta, EMBED)
    app = create_app(settings, services=svc)
    try:
        with serve_app(app) as url, httpx.Client(base_url=f"{url}/api/v1") as api:
            api.headers["Authorization"] = f"Bearer {admin}"

            def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
                r = api.post(path, json=body, timeout=120)
                assert r.status_code == 201, r.text
                out: dict[str, Any] = r.json()
                return out

            post("/deployments", {"name": CHAT, "model": CHAT})
            post("/deployments", {"name": EMBED, "model": EMBED})
            post("/deployments", {"name": BUSY, "model": CHAT, "max_batch_size": 1, "max_queue": 1})
            key = post("/keys", {"project": "default", "scopes": ["predict"]})["key"]
            reader = post("/keys", {"project": "default", "scopes": ["read"]})["key"]
            chat, embed = LMBundle.load(chat_dir), EmbeddingBundle.load(embed_dir)
            yield Server(url, app, key, reader, admin, chat, embed)
    finally:
        svc.db.dispose()


# ---- models -----------------------------------------------------------------------------


def test_models_lists_the_generation_and_embedding_deployments(server: Server) -> None:
    client = server.client()
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {CHAT, EMBED, BUSY}
    assert all(m.object == "model" and m.owned_by == "default" for m in models.values())
    assert abs(models[CHAT].created - time.time()) < 600
    one = client.models.retrieve(EMBED)
    assert one.id == EMBED and one.owned_by == "default"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("nope")
    assert missing.value.body["param"] == "model"  # type: ignore[index]


# ---- chat ---------------------------------------------------------------------------


def test_chat_equals_the_library_and_counts_real_tokens(server: Server) -> None:
    answer = server.client().chat.completions.create(
        model=CHAT, messages=MESSAGES, max_tokens=12, temperature=0
    )
    expected = server.chat.generate(MESSAGES, max_new_tokens=12, temperature=0.0)
    assert answer.object == "chat.completion" and answer.model == CHAT
    assert answer.system_fingerprint == "v1"
    [choice] = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(server.chat.prompt_ids(MESSAGES))
    assert answer.usage.completion_tokens == len(expected.token_ids) == 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12


def test_chat_streamed_with_usage(server: Server) -> None:
    stream = server.client().chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello world"}]}],
        max_completion_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    expected = server.chat.generate("hello world", max_new_tokens=9, temperature=0.0)
    assert text == expected.text
    assert last.usage.prompt_tokens == len(server.chat.prompt_ids("hello world"))
    assert last.usage.completion_tokens == 9
    assert {c.id for c in chunks} == {chunks[0].id}
    # metered as inference requests of the deployment and version that answered
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {server.key}"})
    assert (
        'kiln_requests_total{code="200",deployment="tiny-chat",project="default",version="1"}'
        in metrics.text
    )


def test_n_seed_and_stop(server: Server) -> None:
    client = server.client()

    def sample(**kwargs: Any) -> Any:
        return client.chat.completions.create(
            model=CHAT, messages=MESSAGES, max_tokens=24, temperature=1.0, **kwargs
        )

    one, again, other = sample(seed=7), sample(seed=7), sample(seed=8)
    text = one.choices[0].message.content
    assert text == again.choices[0].message.content  # same seed, same sample
    assert text != other.choices[0].message.content
    two = sample(seed=7, n=2)  # choice i samples with seed + i
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == text
    assert two.choices[1].message.content == other.choices[0].message.content
    assert two.usage.completion_tokens == (
        one.usage.completion_tokens + other.usage.completion_tokens
    )
    assert two.usage.prompt_tokens == one.usage.prompt_tokens

    assert len(text) >= 6, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = sample(seed=7, stop=[stop, "never-in-the-text"])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_async_client_streams_concurrent_requests(server: Server) -> None:
    async def main() -> list[str]:
        client = server.async_client()

        async def one(seed: int) -> str:
            stream = await client.chat.completions.create(
                model=CHAT, messages=MESSAGES, max_tokens=10, temperature=1, seed=seed, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return list(await asyncio.gather(one(1), one(2), one(1)))
        finally:
            await client.close()

    first, second, third = asyncio.run(main())
    assert first == third and first != second
    alone = server.client().chat.completions.create(
        model=CHAT, messages=MESSAGES, max_tokens=10, temperature=1, seed=2
    )
    assert alone.choices[0].message.content == second


# ---- completions and embeddings ----------------------------------------------------------


def test_completions_of_text_and_token_ids(server: Server) -> None:
    from kiln.data.lm_encode import prompt_ids

    client = server.client()
    ids = prompt_ids(server.chat.tokenizer, "the quick brown fox", chat=False)
    expected = server.chat.generator.generate([ids], server.chat.params(max_new_tokens=8))[0]
    text = client.completions.create(model=CHAT, prompt="the quick brown fox", max_tokens=8)
    assert text.object == "text_completion"
    assert text.choices[0].text == expected.text
    assert text.usage is not None and text.usage.prompt_tokens == len(ids)
    tokens = client.completions.create(model=CHAT, prompt=[ids, ids], max_tokens=8)
    assert [c.text for c in tokens.choices] == [expected.text] * 2
    assert tokens.usage is not None and tokens.usage.prompt_tokens == 2 * len(ids)
    streamed = client.completions.create(model=CHAT, prompt=ids, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text


def test_embeddings_float_and_base64_equal_the_library(server: Server) -> None:
    client = server.client()
    texts = ["hello world", "a journey of a thousand miles"]
    expected = server.embed.embed(texts)
    floats = client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in floats.data], expected, atol=1e-6)
    assert [d.index for d in floats.data] == [0, 1] and floats.model == EMBED
    counted = server.embed.tokenizer(texts)["input_ids"]
    assert floats.usage.prompt_tokens == sum(len(ids) for ids in counted)
    raw = client.embeddings.create(model=EMBED, input=texts, encoding_format="base64")
    vectors = [np.frombuffer(base64.b64decode(str(d.embedding)), dtype="<f4") for d in raw.data]
    np.testing.assert_array_equal(np.stack(vectors), expected.astype(np.float32))
    # the client's default asks for base64 and decodes it itself
    default = client.embeddings.create(model=EMBED, input="hello world")
    np.testing.assert_allclose(default.data[0].embedding, expected[0], atol=1e-6)
    ids = server.embed.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    by_ids = client.embeddings.create(model=EMBED, input=[ids], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, expected[0], atol=1e-6)
    with pytest.raises(openai.BadRequestError) as dims:
        client.embeddings.create(model=EMBED, input="x", dimensions=8)
    assert dims.value.body["param"] == "dimensions"  # type: ignore[index]


# ---- errors ---------------------------------------------------------------------------


def test_each_error_class(server: Server) -> None:
    client = server.client()
    chat = client.chat.completions
    with pytest.raises(openai.AuthenticationError):
        server.client("not-a-key").models.list()
    with pytest.raises(openai.PermissionDeniedError):
        server.client(server.reader).chat.completions.create(model=CHAT, messages=MESSAGES)
    with pytest.raises(openai.NotFoundError) as missing:
        chat.create(model="nope", messages=MESSAGES)
    assert missing.value.body["param"] == "model"  # type: ignore[index]
    assert missing.value.body["type"] == "invalid_request_error"  # type: ignore[index]

    def refused(param: str, **kwargs: Any) -> None:
        with pytest.raises(openai.BadRequestError) as bad:
            model, messages = kwargs.pop("model", CHAT), kwargs.pop("messages", MESSAGES)
            chat.create(model=model, messages=messages, **kwargs)
        assert bad.value.body["param"] == param, bad.value.body  # type: ignore[index]

    refused("presence_penalty", presence_penalty=2.5)
    refused("response_format", response_format={"type": "json_schema"})  # no schema
    refused("top_logprobs", top_logprobs=2)  # without logprobs: true
    refused("wibble", extra_body={"wibble": 1})  # unknown fields, as OpenAI refuses them
    refused("temperature", temperature=3)
    refused("messages", messages=[])
    refused("messages", messages=[{"role": "user", "content": "x " * 3000}])  # past the context
    refused("model", model=EMBED)  # an embedding deployment asked to chat
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=CHAT, input="x")
    # a project key cannot name another project; a global key names one by OpenAI-Project
    with pytest.raises(openai.NotFoundError) as other:
        server.client(project="other").models.list()
    assert other.value.body["param"] == "project"  # type: ignore[index]
    assert [m.id for m in server.client(server.admin, "default").models.list()] == sorted(
        [CHAT, EMBED, BUSY]
    )
    # the rest of kiln keeps its own error shape
    r = httpx.get(f"{server.url}/api/v1/deployments/nope", headers={"Authorization": "Bearer x"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"code", "message", "field"}


def test_a_full_engine_is_a_503_with_retry_after(server: Server) -> None:
    # one decoding slot and one waiting place: eight sequences cannot all be admitted
    with pytest.raises(openai.InternalServerError) as full:
        server.client().chat.completions.create(model=BUSY, messages=MESSAGES, n=8, max_tokens=200)
    assert full.value.status_code == 503
    assert full.value.response.headers["retry-after"] == "1"
    # the sequences it did admit were cancelled with it
    wait_for(lambda: server.served(BUSY).engine.stats().running == 0, timeout=10)


def test_a_client_that_disconnects_frees_its_slot(server: Server) -> None:
    engine = server.served(CHAT).engine
    stamps: list[float] = []
    with server.client().chat.completions.create(
        model=CHAT, messages=MESSAGES, max_tokens=1900, temperature=0, stream=True
    ) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
            if len(stamps) == 20:
                break
        assert len(stamps) == 20
        assert engine.stats().running == 1  # still generating its 1,900 tokens
    closed = time.perf_counter()
    wait_for(lambda: engine.stats().running == 0, timeout=10, what="the slot to be freed")
    freed = time.perf_counter() - closed
    # what the rest would have taken at the pace it streamed (one token per chunk)
    rest = (1900 - 20) * (stamps[-1] - stamps[0]) / 19
    assert freed < rest / 4, (freed, rest)
    again = server.client().chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=3)
    assert again.choices[0].finish_reason == "length"


def test_a_completion_format_bundle_refuses_messages(server: Server) -> None:
    from types import SimpleNamespace

    from kiln.serve.openai import chat_prompt
    from kiln.serve.openai_schemas import ChatMessage

    assert server.chat.path is not None
    bundle = LMBundle.load(server.chat.path)
    bundle.generation = bundle.generation.model_copy(update={"prompt_format": "completion"})
    with pytest.raises(DataError, match="use /v1/completions") as refused:
        chat_prompt(SimpleNamespace(bundle=bundle), [ChatMessage(role="user", content="hi")])
    assert refused.value.field == "messages"


def test_past_the_inference_rate_limit_the_client_gets_a_rate_limit_error(
    tmp_path: Path,
) -> None:
    from kiln.app import build_services, create_app
    from kiln.server import bootstrap
    from kiln.settings import Settings
    from kiln.standalone import register

    chat_dir, _ = _bundles(tmp_path)
    settings = Settings(home=tmp_path / "home", rate_limit_inference="2/minute")
    svc = build_services(settings)
    admin = bootstrap(svc)
    register(svc, chat_dir, LMBundle.load(chat_dir).meta, CHAT)
    app = create_app(settings, services=svc)
    try:
        with serve_app(app) as url:
            headers = {"Authorization": f"Bearer {admin}"}
            body = {"name": CHAT, "model": CHAT}
            r = httpx.post(f"{url}/api/v1/deployments", json=body, headers=headers, timeout=120)
            assert r.status_code == 201, r.text
            client = openai.OpenAI(
                base_url=f"{url}/v1", api_key=str(admin), project="default", max_retries=0
            )
            for _ in range(2):
                client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=2)
            with pytest.raises(openai.RateLimitError) as limited:
                client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=2)
            assert int(limited.value.response.headers["Retry-After"]) >= 1
            assert limited.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    finally:
        svc.db.dispose()


# ---- structured output, penalties and logprobs ----------------------------------------

THING: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "count": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "count", "color"],
    "additionalProperties": False,
}


def test_chat_json_schema_streamed_and_not(server: Server) -> None:
    import json

    chat = server.client().chat.completions
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "thing", "schema": THING}}
    ask: dict[str, Any] = {"temperature": 1.0, "seed": 5, "max_tokens": 200, "n": 2}
    whole = chat.create(model=CHAT, messages=MESSAGES, response_format=fmt, **ask)
    for choice in whole.choices:
        assert choice.finish_reason == "stop", choice.message.content
        value = json.loads(choice.message.content or "")
        assert set(value) == {"name", "count", "color"}
        assert value["color"] in ("red", "green", "blue")
        assert isinstance(value["name"], str) and type(value["count"]) is int
    texts = ["", ""]
    finishes: list[str | None] = [None, None]
    for chunk in chat.create(
        model=CHAT, messages=MESSAGES, response_format=fmt, stream=True, **ask
    ):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == [c.message.content for c in whole.choices]  # same seeds, same answers
    assert finishes == ["stop", "stop"]
    bad: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        chat.create(model=CHAT, messages=MESSAGES, response_format=bad)
    assert refused.value.body["param"] == "response_format"  # type: ignore[index]


def test_chat_logprobs_streamed_and_not(server: Server) -> None:
    chat = server.client().chat.completions
    ask: dict[str, Any] = {"temperature": 0, "max_tokens": 6, "logprobs": True, "top_logprobs": 3}
    whole = chat.create(model=CHAT, messages=MESSAGES, **ask)
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert whole.usage is not None
    eos = 1 if choice.finish_reason == "stop" else 0  # the end token has no record
    assert len(content) in (whole.usage.completion_tokens - eos, whole.usage.completion_tokens)
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy
        assert entry.bytes is not None and bytes(entry.bytes).decode(errors="replace")
    joined = b"".join(bytes(e.bytes or []) for e in content).decode(errors="replace")
    assert joined.startswith(choice.message.content or "")
    streamed = []
    for chunk in chat.create(model=CHAT, messages=MESSAGES, stream=True, **ask):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = chat.create(model=CHAT, messages=MESSAGES, temperature=0, max_tokens=6)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content
    with pytest.raises(openai.BadRequestError) as refused:
        chat.create(model=CHAT, messages=MESSAGES, top_logprobs=2)
    assert refused.value.body["param"] == "top_logprobs"  # type: ignore[index]


def test_completion_logprobs_and_penalties(server: Server) -> None:
    client = server.client()
    done = client.completions.create(
        model=CHAT, prompt="hello world", max_tokens=5, temperature=0, logprobs=2
    )
    lp = done.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    streamed: list[str] = []
    for chunk in client.completions.create(
        model=CHAT, prompt="hello world", max_tokens=5, temperature=0, logprobs=2, stream=True
    ):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.tokens:
                streamed.extend(c.logprobs.tokens)
    assert streamed == lp.tokens
    ask: dict[str, Any] = {"prompt": "hello world", "max_tokens": 30, "temperature": 0}
    free = client.completions.create(model=CHAT, **ask)
    penalised = client.completions.create(model=CHAT, frequency_penalty=2.0, **ask)
    assert free.choices[0].text != penalised.choices[0].text
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=CHAT, presence_penalty=2.5, **ask)
    assert refused.value.body["param"] == "presence_penalty"  # type: ignore[index]
