"""Token metering of the ``/v1`` routes against a real uvicorn server, with the official
``openai`` client: tokens metered per (deployment, key) equal the usage the client was
told, the ``tokens`` quota refuses at the door (``openai.RateLimitError`` naming it)
and ends a stream at the limit with an error event and the usage so far, and
``/metrics`` has the language-model series. A tiny random Llama (chat) and a tiny
random BERT encoder, deployed through kiln's own API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from kiln.lm_bundle import EmbeddingBundle, LMBundle
from support import serve_app, tiny_bpe, tiny_llama, wait_for

CHAT = "tiny-chat"
CHAT2 = "tiny-chat-2"  # a second deployment of the same version
EMBED = "tiny-embed"
MESSAGES: list[Any] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "hello world"},
]
Usage = dict[tuple[str, str, str], float]  # (kind, deployment, key id) -> tokens


@dataclass
class Key:
    id: str
    secret: str


@dataclass
class Server:
    url: str
    app: FastAPI
    api: httpx.Client  # /api/v1 with the global admin key
    admin: str
    k1: Key
    k2: Key
    chat: LMBundle

    def client(self, key: Key) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key.secret, max_retries=0)

    def usage(self) -> Usage:
        r = self.api.get(
            "/usage", params={"project": "default", "group_by": "total", "by": "deployment,key"}
        )
        assert r.status_code == 200, r.text
        return _tokens(r.json()["items"])

    def set_quota(self, limit: float | None) -> dict[str, Any]:
        body = {"project": "default", "kind": "tokens", "period": "day", "limit": limit}
        r = self.api.put("/quotas", json=body)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def settled_usage(self) -> Usage:
        """The usage once every counted token is written (two equal reads in a row)."""
        last: list[Usage] = [self.usage()]

        def steady() -> tuple[Usage] | None:
            now = self.usage()
            same = now == last[0]
            last[0] = now
            return (now,) if same and self.pending() == 0 else None

        return wait_for(steady, timeout=30, interval=0.3, what="the usage to be written")[0]

    def pending(self) -> float:
        meter = self.app.state.deployments.monitor.meter
        return float(meter.pending_tokens(1))


def _bundles(root: Path) -> tuple[Path, Path]:
    """A chat bundle (a random Llama with a 2048-token context) and an embedding bundle
    (a random one-layer BERT), imported as kiln does."""
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

    root = tmp_path_factory.mktemp("metering")
    chat_dir, embed_dir = _bundles(root)
    settings = Settings(home=root / "home", monitor_flush_seconds=0.2)
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
            post("/deployments", {"name": CHAT2, "model": CHAT})
            post("/deployments", {"name": EMBED, "model": EMBED})
            keys = [post("/keys", {"project": "default", "scopes": ["predict"]}) for _ in "12"]
            k1, k2 = (Key(k["id"], k["key"]) for k in keys)
            yield Server(url, app, api, admin, k1, k2, LMBundle.load(chat_dir))
    finally:
        svc.db.dispose()


def _tokens(items: list[dict[str, Any]]) -> Usage:
    """The token kinds of usage items split by deployment and key."""
    return {
        (i["kind"], i["deployment"], i["key"]): i["quantity"]
        for i in items
        if i["kind"] in ("prompt_tokens", "completion_tokens")
    }


def _add(into: Usage, kind: str, deployment: str, key: Key, tokens: int) -> None:
    if tokens:
        into[(kind, deployment, key.id)] = into.get((kind, deployment, key.id), 0.0) + tokens


def test_tokens_are_metered_per_deployment_and_key_as_the_client_saw_them(
    server: Server,
) -> None:
    expected: Usage = {}
    one, two = server.client(server.k1), server.client(server.k2)

    chat = one.chat.completions.create(
        model=CHAT, messages=MESSAGES, max_tokens=6, n=2, temperature=0
    )
    assert chat.usage is not None
    _add(expected, "prompt_tokens", CHAT, server.k1, chat.usage.prompt_tokens)
    _add(expected, "completion_tokens", CHAT, server.k1, chat.usage.completion_tokens)

    chunks = list(
        two.chat.completions.create(
            model=CHAT,
            messages=MESSAGES,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = chunks[-1].usage
    assert streamed is not None and streamed.completion_tokens == 5
    _add(expected, "prompt_tokens", CHAT, server.k2, streamed.prompt_tokens)
    _add(expected, "completion_tokens", CHAT, server.k2, streamed.completion_tokens)

    text = one.completions.create(model=CHAT2, prompt=["the quick brown fox", "a"], max_tokens=4)
    assert text.usage is not None
    _add(expected, "prompt_tokens", CHAT2, server.k1, text.usage.prompt_tokens)
    _add(expected, "completion_tokens", CHAT2, server.k1, text.usage.completion_tokens)

    vectors = two.embeddings.create(model=EMBED, input=["hello", "world wide web"])
    _add(expected, "prompt_tokens", EMBED, server.k2, vectors.usage.prompt_tokens)

    assert server.settled_usage() == expected

    # /metrics: the token counters by project, deployment and version, the latencies
    # and the engine gauges (one engine serves both chat deployments)
    from prometheus_client.parser import text_string_to_metric_families

    scraped = httpx.get(
        f"{server.url}/metrics", headers={"Authorization": f"Bearer {server.admin}"}
    ).text
    samples = {
        (sample.name, sample.labels.get("deployment")): sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
        if sample.labels.get("project") == "default" and sample.labels.get("version") == "1"
    }

    def value(name: str, deployment: str = CHAT) -> float:
        assert (name, deployment) in samples, f"{name} of {deployment} is not in /metrics"
        return samples[(name, deployment)]

    assert value("kiln_llm_prompt_tokens_total") == (
        chat.usage.prompt_tokens + streamed.prompt_tokens
    )
    completion = chat.usage.completion_tokens + streamed.completion_tokens
    assert value("kiln_llm_completion_tokens_total") == completion
    assert value("kiln_llm_completion_tokens_total", CHAT2) == text.usage.completion_tokens
    assert value("kiln_llm_prompt_tokens_total", EMBED) == vectors.usage.prompt_tokens
    assert value("kiln_llm_time_to_first_token_seconds_count") == 3  # 3 sequences
    assert value("kiln_llm_inter_token_latency_seconds_count") == completion - 3
    for deployment in (CHAT, CHAT2):
        assert value("kiln_llm_running_sequences", deployment) == 0
        assert value("kiln_llm_waiting_sequences", deployment) == 0
        assert value("kiln_llm_kv_cache_budget_tokens", deployment) > 0
        assert value("kiln_llm_kv_cache_tokens", deployment) == 0

    # the CLI groups them too
    from kiln.cli.main import app

    result = CliRunner().invoke(
        app,
        ["usage", "--group-by", "total", "--by", "deployment", "--by", "key", "--json",
         "--url", server.url, "--api-key", server.admin],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["by"] == ["deployment", "key"]
    assert _tokens(doc["items"]) == expected
    result = CliRunner().invoke(
        app,
        ["usage", "--group-by", "total", "--by", "deployment,key",
         "--url", server.url, "--api-key", server.admin],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "prompt_tokens" in line]
    # (a narrow terminal shortens the key ids)
    assert any(CHAT2 in line and server.k1.id[:8] in line for line in lines), result.output


def test_the_dashboard_usage_page_shows_tokens_per_deployment(server: Server) -> None:
    import re

    used = server.settled_usage()
    csrf = re.compile(r'name="csrf" value="([^"]*)"')
    with httpx.Client(base_url=server.url, timeout=60) as browser:
        form = browser.get("/login").text
        token = csrf.search(form)
        assert token is not None
        data = {"csrf": token.group(1), "key": server.admin, "project": "default", "next": "/"}
        assert browser.post("/login", data=data).status_code == 303
        page = browser.get("/usage")
    assert page.status_code == 200, page.text
    rows = re.findall(
        r'<tr data-deployment="([^"]+)"><td>[^<]*</td><td class="prompt">([^<]*)</td>'
        r'<td class="completion">([^<]*)</td></tr>',
        page.text,
    )

    def total(kind: str, deployment: str) -> str:
        tokens = sum(q for (k, d, _), q in used.items() if (k, d) == (kind, deployment))
        return f"{tokens:,.0f}"

    assert rows == [
        (name, total("prompt_tokens", name), total("completion_tokens", name))
        for name in (CHAT, CHAT2, EMBED)
    ]
    assert 'id="usage-tokens-chart"' in page.text


def test_a_tokens_quota_refuses_with_a_rate_limit_error_naming_it(server: Server) -> None:
    server.settled_usage()
    used = server.set_quota(1e12)["used"]  # every token so far is written
    from kiln.cli.main import app

    result = CliRunner().invoke(
        app,
        ["quotas", "set", "tokens", f"{used:g}", "--period", "day", "--project", "default",
         "--url", server.url, "--api-key", server.admin],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"tokens limited to {used:,.0f} per day" in result.output
    client = server.client(server.k1)
    try:
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=2)
        body: Any = refused.value.body
        assert body["code"] == "insufficient_quota" and body["param"] == "tokens"
        assert f"quota exceeded: tokens per day is {used:g}" in body["message"]
        with pytest.raises(openai.RateLimitError, match="tokens per day"):
            client.embeddings.create(model=EMBED, input="hello")
        with pytest.raises(openai.RateLimitError, match="tokens per day"):
            client.completions.create(model=CHAT, prompt="a", max_tokens=2, stream=True)

        # unstreamed, prompt + max_tokens must fit; 5 tokens of room
        prompt = len(server.chat.prompt_ids(MESSAGES))
        server.set_quota(used + prompt + 5)
        with pytest.raises(openai.RateLimitError, match=f"this needs {prompt + 10} more"):
            client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=10)
        ok = client.chat.completions.create(
            model=CHAT, messages=MESSAGES, max_tokens=5, temperature=0
        )
        assert ok.usage is not None and ok.usage.total_tokens == prompt + 5
    finally:
        server.set_quota(None)
    assert server.settled_usage()  # written, for the next test's arithmetic


def test_a_stream_that_reaches_the_quota_ends_with_an_error_event_and_the_usage(
    server: Server,
) -> None:
    before = server.settled_usage()
    used = server.set_quota(1e12)["used"]
    prompt = len(server.chat.prompt_ids(MESSAGES))
    server.set_quota(used + prompt + 8)  # room for 8 generated tokens
    request = {
        "model": CHAT,
        "messages": MESSAGES,
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        with httpx.stream(
            "POST",
            f"{server.url}/v1/chat/completions",
            json=request,
            headers={"Authorization": f"Bearer {server.k2.secret}"},
            timeout=60,
        ) as r:
            assert r.status_code == 200
            events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        server.set_quota(None)
    *chunks, error, done = events
    assert done == "[DONE]"
    problem = json.loads(error)["error"]
    assert problem["code"] == "insufficient_quota" and problem["param"] == "tokens"
    assert problem["type"] == "rate_limit_error"
    assert "quota exceeded: tokens per day" in problem["message"]
    parsed = [json.loads(c) for c in chunks]
    finishes = [c["choices"][0]["finish_reason"] for c in parsed if c["choices"]]
    assert finishes[-1] == "length" and finishes.count(None) == len(finishes) - 1
    usage = parsed[-1]["usage"]  # the usage chunk: no choices, the tokens so far
    assert parsed[-1]["choices"] == [] and usage["prompt_tokens"] == prompt
    assert usage["completion_tokens"] == 8  # max_tokens was cut to what the quota left
    after = server.settled_usage()
    key = server.k2.id
    assert (
        after[("completion_tokens", CHAT, key)] - before[("completion_tokens", CHAT, key)]
        == (usage["completion_tokens"])
    )
    assert after[("prompt_tokens", CHAT, key)] - before[("prompt_tokens", CHAT, key)] == prompt


def test_the_openai_client_raises_at_the_quota_event_after_the_chunks(server: Server) -> None:
    server.settled_usage()
    used = server.set_quota(1e12)["used"]
    prompt = len(server.chat.prompt_ids(MESSAGES))
    server.set_quota(used + prompt + 6)
    seen: list[Any] = []
    try:
        stream = server.client(server.k1).chat.completions.create(
            model=CHAT,
            messages=MESSAGES,
            max_tokens=60,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        with pytest.raises(openai.APIError, match="tokens per day") as stopped:
            for chunk in stream:
                seen.append(chunk)
    finally:
        server.set_quota(None)
    assert not isinstance(stopped.value, openai.APIStatusError)  # a 200 stream, cut
    assert seen[-1].usage is not None and seen[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in seen if c.choices][-1] == "length"
