"""The dashboard's chat playground of a generation deployment and the fine-tuning jobs in
the jobs list (issue #14), against a real uvicorn server: a tiny random Llama deployed as
a chat model, an iris MLP deployed as a classic one, and a fine-tuning job created
through ``/v1/fine_tuning/jobs`` and run by a kiln worker."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from web_support import MARKUP, csrf_of, screenshot, sign_in, sign_in_page

from support import serve_app, tiny_bpe, tiny_llama, wait_for, write_chats

CHAT = "tiny-chat"
CLASSIC = "iris"
BASE = "tiny-llama"
MESSAGES = [{"role": "user", "content": "I want a red pen. Which colour?"}]
SYSTEM = "Answer with the colour only."
MAX_TOKENS = 12


@dataclass
class Server:
    url: str
    app: Any
    admin: str
    chatter: str  # project default: read, predict
    reader: str  # project default: read only
    ftjob: str  # a fine-tuning job, run to the end

    @contextmanager
    def browser(self, key: str | None = None) -> Iterator[httpx.Client]:
        """A client with its own cookie jar, signed in with ``key`` unless None."""
        with httpx.Client(base_url=self.url, follow_redirects=False, timeout=60) as client:
            if key is not None:
                sign_in(client, key)  # type: ignore[arg-type]  # any httpx client signs in
            yield client

    def rest(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.admin}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=120, **kwargs)


def _iris_bundle(root: Path) -> Path:
    import kiln

    spec: dict[str, Any] = {
        "name": CLASSIC,
        "task": "classification",
        "data": {"source": "sklearn:iris", "target": "target"},
        "model": {"type": "mlp", "hidden": [4]},
        "train": {"epochs": 1, "device": "cpu"},
    }
    out = root / "iris"
    kiln.fit(spec, out=out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from kiln.app import build_services, create_app
    from kiln.bundle import Bundle
    from kiln.jobs.worker import Worker
    from kiln.lm_bundle import LMBundle
    from kiln.lm_workflow import import_pretrained
    from kiln.server import bootstrap
    from kiln.settings import Settings
    from kiln.standalone import register

    root = tmp_path_factory.mktemp("playground")
    chats = write_chats(root / "chats.jsonl", n=8)
    tok = tiny_bpe(chats.read_text().splitlines())
    tiny_llama(tok).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    chat_dir = import_pretrained(str(root / "llama"), name=CHAT).save(root / "chat-bundle")
    iris_dir = _iris_bundle(root)
    settings = Settings(home=root / "home", rate_limit_api="off", rate_limit_inference="off")
    svc = build_services(settings)
    admin = bootstrap(svc)
    assert admin is not None
    register(svc, chat_dir, LMBundle.load(chat_dir).meta, CHAT)
    register(svc, iris_dir, Bundle.load(iris_dir).meta, CLASSIC)
    app = create_app(settings, services=svc)
    try:
        with serve_app(app) as url:
            made = Server(url, app, admin, "", "", "")
            for name in (CHAT, CLASSIC):
                r = made.rest("POST", "/api/v1/deployments", json={"name": name, "model": name})
                assert r.status_code == 201, r.text
            keys = []
            for scopes in (["read", "predict"], ["read"]):
                body = {"project": "default", "scopes": scopes}
                r = made.rest("POST", "/api/v1/keys", json=body)
                assert r.status_code == 201, r.text
                keys.append(r.json())
            made.chatter, made.reader = keys[0]["key"], keys[1]["key"]
            r = made.rest(
                "POST", "/api/v1/base-models", json={"name": BASE, "source": str(root / "llama")}
            )
            assert r.status_code == 201, r.text
            files = {"file": ("chats.jsonl", chats.read_bytes())}
            r = made.rest("POST", "/v1/files", files=files, data={"purpose": "fine-tune"})
            assert r.status_code == 200, r.text
            job: dict[str, Any] = {
                "model": BASE,
                "training_file": r.json()["id"],
                "hyperparameters": {"n_epochs": 2, "batch_size": 4},
            }
            r = made.rest("POST", "/v1/fine_tuning/jobs", json=job)
            assert r.status_code == 200, r.text
            made.ftjob = r.json()["id"]
            worker = Worker(settings, db=svc.db, store=svc.store)
            thread = threading.Thread(target=worker.run, kwargs={"until_idle": True}, daemon=True)
            thread.start()
            thread.join(120)
            assert not thread.is_alive(), "the fine-tuning job did not finish"
            yield made
    finally:
        svc.db.dispose()


def greedy_answer(server: Server) -> str:
    """The /v1 answer (non-streamed, temperature 0) to MESSAGES with SYSTEM."""
    body = {
        "model": CHAT,
        "messages": [{"role": "system", "content": SYSTEM}, *MESSAGES],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {server.chatter}"}
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    text: str = answer.json()["choices"][0]["message"]["content"]
    return text


def events(response: httpx.Response) -> list[Any]:
    """The JSON of every ``data:`` line of an SSE answer (``[DONE]`` as the string)."""
    out: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def form(csrf: str | None, **fields: str) -> dict[str, str]:
    base = {"messages": json.dumps(MESSAGES), "system": SYSTEM, "max_tokens": str(MAX_TOKENS)}
    base |= {"temperature": "0"} | fields
    return base | ({"csrf": csrf} if csrf is not None else {})


STREAM = f"/deployments/{CHAT}/playground/stream"


# ---- the pages ------------------------------------------------------------------------


def test_the_playground_page_of_a_generation_deployment(server: Server) -> None:
    with server.browser(server.chatter) as browser:
        page = browser.get(f"/deployments/{CHAT}/playground")
        assert page.status_code == 200, page.text
        html = page.text
        assert 'id="playground-form"' in html and 'name="system"' in html
        assert f'data-url="{STREAM}"' in html
        assert re.search(r'src="/static/playground\.js\?v=\w+"', html)
        assert 'data-engine="running">0<' in html and 'data-engine="waiting">0<' in html
        for key in (server.chatter, server.admin, server.reader):  # no key reaches the page
            assert key not in html
        assert csrf_of(html)  # the session's form token, for the stream's POST
        js = browser.get("/static/playground.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert "textContent" in js.text and "innerHTML" not in js.text  # text, never markup

        deployment = browser.get(f"/deployments/{CHAT}").text
        assert 'id="deployment-task">generation<' in deployment
        assert f'href="/deployments/{CHAT}/playground"' in deployment
        stats = re.search(r'<table class="list" id="engine-stats">.*?</table>', deployment, re.S)
        assert stats is not None
        assert '<td class="running">0</td>' in stats.group(0)
        assert '<td class="waiting">0</td>' in stats.group(0)


def test_a_classic_deployment_has_no_playground(server: Server) -> None:
    with server.browser(server.chatter) as browser:
        page = browser.get(f"/deployments/{CLASSIC}/playground")
        assert page.status_code == 409
        assert "serves no generation model (classification)" in page.text
        deployment = browser.get(f"/deployments/{CLASSIC}").text
        assert 'id="deployment-task">classification<' in deployment
        assert "playground" not in deployment and "engine-stats" not in deployment
        csrf = csrf_of(deployment)
        refused = browser.post(f"/deployments/{CLASSIC}/playground/stream", data=form(csrf))
        assert refused.status_code == 409, refused.text
        assert browser.get("/deployments/nope/playground").status_code == 404


# ---- the stream -----------------------------------------------------------------------


def test_the_stream_joins_to_the_engines_answer(server: Server) -> None:
    with server.browser(server.chatter) as browser:
        csrf = csrf_of(browser.get(f"/deployments/{CHAT}/playground").text)
        with browser.stream("POST", STREAM, data=form(csrf)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            got = events(response)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["model"] == CHAT
    assert sum(1 for d in deltas if d) >= 2  # streamed in pieces, not one answer

    # the same request on /v1, non-streamed, greedy: the engine's own answer
    body = {
        "model": CHAT,
        "messages": [{"role": "system", "content": SYSTEM}, *MESSAGES],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {server.chatter}"}
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert "".join(deltas) == choice["message"]["content"] == greedy_answer(server) != ""
    assert finish[-1] == choice["finish_reason"]
    assert usage == answer.json()["usage"]


def test_a_conversation_and_a_system_prompt_reach_the_model(server: Server) -> None:
    turns = [
        *MESSAGES,
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and?"},
    ]
    with server.browser(server.chatter) as browser:
        csrf = csrf_of(browser.get(f"/deployments/{CHAT}/playground").text)
        alone = events(browser.post(STREAM, data=form(csrf, system="")))
        longer = events(browser.post(STREAM, data=form(csrf, messages=json.dumps(turns))))
    assert longer[-2]["usage"]["prompt_tokens"] > alone[-2]["usage"]["prompt_tokens"]


def test_the_stream_needs_a_session_the_csrf_token_and_the_predict_scope(
    server: Server,
) -> None:
    with server.browser() as anonymous:
        refused = anonymous.post(STREAM, data=form("x"))
        assert refused.status_code == 401
        # an API key is no way in: the endpoint acts for a dashboard session only
        bearer = {"Authorization": f"Bearer {server.chatter}"}
        assert anonymous.post(STREAM, data=form("x"), headers=bearer).status_code == 401
    with server.browser(server.chatter) as browser:
        csrf = csrf_of(browser.get(f"/deployments/{CHAT}/playground").text)
        assert browser.post(STREAM, data=form(None)).status_code == 403
        assert browser.post(STREAM, data=form(csrf + "x")).status_code == 403
        bad = browser.post(STREAM, data=form(csrf, messages='[{"role": "tool"}]'))
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "messages"
        hot = browser.post(STREAM, data=form(csrf, temperature="9"))
        assert hot.status_code == 422 and hot.json()["error"]["field"] == "temperature"
    with server.browser(server.reader) as reader:
        page = reader.get(f"/deployments/{CHAT}/playground").text
        assert "lacks the 'predict' scope" in page
        forbidden = reader.post(STREAM, data=form(csrf_of(page)))
        assert forbidden.status_code == 403 and "predict" in forbidden.text


def test_the_playground_is_metered_as_the_keys_usage(server: Server) -> None:
    body = {"project": "default", "scopes": ["read", "predict"]}
    made = server.rest("POST", "/api/v1/keys", json=body).json()  # used by this test only

    def tokens() -> dict[str, float]:
        params = {"project": "default", "group_by": "total", "by": "key"}
        items = server.rest("GET", "/api/v1/usage", params=params).json()["items"]
        return {i["kind"]: i["quantity"] for i in items if i["key"] == made["id"]}

    with server.browser(made["key"]) as browser:
        csrf = csrf_of(browser.get(f"/deployments/{CHAT}/playground").text)
        used = events(browser.post(STREAM, data=form(csrf)))[-2]["usage"]
    assert used["completion_tokens"] > 0
    expected = {k: used[k] for k in ("prompt_tokens", "completion_tokens")}
    wait_for(lambda: tokens() == expected, what="the playground's tokens in the key's usage")


# ---- fine-tuning jobs -------------------------------------------------------------------


def test_the_jobs_list_marks_fine_tuning_jobs_with_their_base_model(server: Server) -> None:
    job_id = server.ftjob.removeprefix("ftjob-")
    with server.browser(server.reader) as browser:
        html = browser.get("/jobs").text
        rows = dict(re.findall(r'<tr data-job="([^"]+)">(.*?)</tr>', html, re.S))
        assert job_id in rows
        assert 'class="tag fine-tune"' in rows[job_id]
        assert f'<span class="small base-model" title="base model">{BASE}</span>' in rows[job_id]
        page = browser.get(f"/jobs/{job_id}").text
        facts = re.search(r'<dd id="job-fine-tune">(.*?)</dd>', page, re.S)
        assert facts is not None and server.ftjob in facts.group(1) and BASE in facts.group(1)
        assert "2 epochs, batch size 4" in facts.group(1)
        loss = re.search(
            r'<script type="application/json" id="loss-chart-data">(.*?)</script>', page, re.S
        )
        assert loss is not None
        traces = {t["name"]: t for t in json.loads(loss.group(1))["data"]}
        assert "train_loss" in traces and traces["train_loss"]["x"] == [1, 2]
        assert all(isinstance(y, float) for y in traces["train_loss"]["y"])


# ---- in a browser -----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("chromium")
def test_the_playground_streams_an_answer_in_a_browser(page: Any, server: Server) -> None:
    sign_in_page(page, server.url, server.chatter)
    page.goto(f"{server.url}/deployments/{CHAT}")
    page.click("#playground-link")
    page.wait_for_url(f"**/deployments/{CHAT}/playground")
    page.fill("#system", SYSTEM)
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#temperature", "0")
    page.fill("#message", MESSAGES[0]["content"])
    page.click("#send")
    page.wait_for_selector("#playground[data-done='1']")
    answer = page.inner_text(".turn-assistant .content")
    assert answer == greedy_answer(server) != ""
    stats = {
        k: page.inner_text(f'[data-stat="{k}"]')
        for k in ("ttft", "tokens_per_s", "prompt_tokens", "completion_tokens", "finish_reason")
    }
    assert re.fullmatch(r"\d+\.\d{3} s", stats["ttft"]), stats
    assert int(stats["prompt_tokens"]) > 0 and int(stats["completion_tokens"]) > 0, stats
    assert stats["finish_reason"] in ("stop", "length")
    assert page.is_hidden("#playground-error")
    screenshot(page, "playground")

    # what is typed (and what the model says) is text: markup stays text
    page.fill("#message", MARKUP)
    page.click("#send")
    page.wait_for_selector("#playground[data-done='2']")
    assert page.inner_text(".turn-user >> nth=1").endswith(MARKUP)
    assert page.locator("#conversation script").count() == 0
    assert page.locator(".turn-assistant").count() == 2
