"""Deployments of generation and embedding versions, through a real DeploymentManager.

Tiny bundles are imported from a random Llama and a random BERT saved the way
transformers saves them (``kiln.lm_workflow.import_pretrained``), registered in a
fresh kiln home (its database and artifact store), and deployed: the engine's text
equals ``LMBundle.generate``'s, an embedding deployment's vectors equal
``EmbeddingBundle.embed``'s, a hot swap lets a running stream finish on the old
version while new requests reach the new one, predict refuses a language model (and
the OpenAI-side accessors a classic one) with a message naming the route to use, and
a restarted manager restores both kinds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from support import tiny_bpe, tiny_llama

if TYPE_CHECKING:
    from kiln.lm_bundle import EmbeddingBundle, LMBundle
    from kiln.serve.deployments import DeploymentManager
    from kiln.serve.engine import SequenceStream
    from kiln.services import Services
    from kiln.store.tables import Project

PROMPT = "Which colour is the sky?"
LONG = 96  # tokens of the stream a hot swap must not cut


@dataclass(frozen=True)
class Bundles:
    chat_v1: Path
    chat_v2: Path
    embed: Path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    """Two generation bundles that answer differently (a different depth of random
    Llama) and an embedding bundle, each imported from a saved HF folder."""
    from transformers import BertConfig, BertModel

    from kiln.lm_workflow import import_pretrained

    root = tmp_path_factory.mktemp("lm-bundles")
    tok = tiny_bpe()
    out: dict[str, Path] = {}
    for key, layers in (("chat_v1", 2), ("chat_v2", 1)):
        hf = root / f"hf-{key}"
        # a wide initialisation: varied greedy text (the default repeats one token)
        tiny_llama(tok, num_hidden_layers=layers, initializer_range=0.5).save_pretrained(hf)
        tok.save_pretrained(hf)
        out[key] = import_pretrained(str(hf), name="chat").save(root / key)
    hf = root / "hf-bert"
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(hf)
    tok.save_pretrained(hf)
    out["embed"] = import_pretrained(str(hf), name="embed").save(root / "embed")
    return Bundles(**out)


@dataclass
class Home:
    services: Services
    project: Project
    cache: Path


@pytest.fixture
def home(tmp_path: Path, bundles: Bundles) -> Iterator[Home]:
    """A fresh kiln home with ``chat`` v1, v2 and ``embed`` v1 registered."""
    from kiln.app import build_services
    from kiln.manifest import parse_manifest
    from kiln.settings import Settings
    from kiln.standalone import register

    svc = build_services(Settings(home=tmp_path / "home"))

    def meta(path: Path):  # type: ignore[no-untyped-def]
        import json

        return parse_manifest(json.loads((path / "kiln.json").read_text()), str(path))

    # kiln serve's registration (one artifact key per model name), then a second version
    project = register(svc, bundles.chat_v1, meta(bundles.chat_v1), "chat")
    _register(svc, bundles.chat_v2, "chat", "v2")
    register(svc, bundles.embed, meta(bundles.embed), "embed")
    try:
        yield Home(svc, project, tmp_path / "cache")
    finally:
        svc.db.dispose()


def _register(svc: Services, path: Path, name: str, suffix: str) -> None:
    """Register the bundle at ``path`` as the next version of ``name``."""
    import json

    from kiln.manifest import parse_manifest
    from kiln.store.artifacts import safe_key
    from kiln.store.projects import DEFAULT_PROJECT, ensure_project
    from kiln.store.registry import register_version, registering

    meta = parse_manifest(json.loads((path / "kiln.json").read_text()), str(path))
    key = safe_key("projects", DEFAULT_PROJECT, "models", name, suffix)
    svc.store.put_dir(key, path)

    def work(s):  # type: ignore[no-untyped-def]
        project = ensure_project(s, DEFAULT_PROJECT)
        register_version(
            s,
            project,
            name,
            artifact_key=key,
            task=meta.task,
            metrics={},
            summary={"source": "test"},
            size_bytes=1,
        )

    registering(svc.db, name, work)


async def _manager(home: Home) -> DeploymentManager:
    from kiln.monitor.metrics import ServingMetrics
    from kiln.serve.deployments import DeploymentManager

    manager = DeploymentManager(
        home.services.db,
        home.services.store,
        home.cache,
        ServingMetrics(),
        settings=home.services.settings,
    )
    await manager.restore()
    return manager


async def _text(stream: SequenceStream) -> tuple[str, str | None]:
    """The whole text of a stream and its finish reason."""
    parts, reason = [], None
    async for event in stream:
        parts.append(event.text)
        reason = event.finish_reason
    return "".join(parts), reason


def _load_lm(path: Path) -> LMBundle:
    from kiln.lm_bundle import LMBundle

    return LMBundle.load(path)


def _load_embedder(path: Path) -> EmbeddingBundle:
    from kiln.lm_bundle import EmbeddingBundle

    return EmbeddingBundle.load(path)


def test_a_generation_deployment_generates_what_the_bundle_does(
    home: Home, bundles: Bundles
) -> None:
    from kiln.api.routes.deployments import deployment_out
    from kiln.errors import ConflictError
    from kiln.serve.deployments import NewDeployment
    from kiln.serve.lm import ServedLM
    from kiln.standalone import ServeOptions, lm_banner

    local = _load_lm(bundles.chat_v1)
    expected = local.generate(PROMPT, max_new_tokens=16)

    async def main() -> None:
        manager = await _manager(home)
        try:
            spec = NewDeployment(name="bot", model="chat", version=1)
            live = await manager.create(home.project, spec)
            assert live.task == "generation" and manager.ready()
            got, route, served = manager.language_model(home.project.id, "bot")
            assert got is live and route.version == 1 and isinstance(served, ServedLM)
            assert served.backend_name == "torch" and served.load_seconds > 0
            ids = served.bundle.prompt_ids(PROMPT)
            assert ids == local.prompt_ids(PROMPT)
            stream = served.engine.submit(ids, served.bundle.params(max_new_tokens=16))
            assert await _text(stream) == (expected.text, expected.finish_reason)
            # what the deployment API reports: the task, the runtime, the engine's queue
            out = deployment_out(live)
            assert out.task == "generation" and out.routes[0].backend == "torch"
            assert out.routes[0].queue_depth == 0
            # the classic endpoints refuse it, naming the OpenAI-compatible route
            use = "deployment bot serves a generation model; use /v1/chat/completions"
            with pytest.raises(ConflictError, match=use):
                await manager.predict(home.project.id, "bot", [{"x": 1.0}])
            with pytest.raises(ConflictError, match="/v1/chat/completions"):
                manager.classic(home.project.id, "bot")  # KServe v2's check
            with pytest.raises(ConflictError, match="/v1/chat/completions"):
                manager.embedder(home.project.id, "bot")
            text = "\n".join(lm_banner(ServeOptions(port=9000), "bot", live, "k" * 20))
            assert "http://127.0.0.1:9000/v1/chat/completions" in text
            assert '"model": "bot"' in text and "predict" not in text and "/v2/" not in text
        finally:
            await manager.close()
        assert served.engine.stats().running == 0
        with pytest.raises(Exception, match="shutting down"):  # the engine was closed
            served.engine.submit(ids, served.bundle.params())

    asyncio.run(main())


def test_a_hot_swap_lets_a_running_stream_finish_on_the_old_version(
    home: Home, bundles: Bundles
) -> None:
    from kiln.errors import QueueFull
    from kiln.serve.deployments import DeploymentChange, NewDeployment
    from kiln.store.deployments import DeploymentConfig

    old_bundle, new_bundle = _load_lm(bundles.chat_v1), _load_lm(bundles.chat_v2)
    long = old_bundle.generate(PROMPT, max_new_tokens=LONG)
    assert long.finish_reason == "length"  # a stream that runs LONG tokens
    short_v2 = new_bundle.generate(PROMPT, max_new_tokens=8)
    assert short_v2.text != old_bundle.generate(PROMPT, max_new_tokens=8).text

    # one sequence decodes at a time: the second one waits in the old engine's queue
    config = DeploymentConfig(max_batch_size=1)

    async def main() -> None:
        manager = await _manager(home)
        try:
            spec = NewDeployment(name="bot", model="chat", version=1, config=config)
            await manager.create(home.project, spec)
            # v2 is already loaded for another deployment: the swap below is a switch
            # of milliseconds, while the old version is still decoding
            spec = NewDeployment(name="v2", model="chat", version=2, config=config)
            await manager.create(home.project, spec)
            _, _, old = manager.language_model(home.project.id, "bot")
            ids = old.bundle.prompt_ids(PROMPT)
            running = old.engine.submit(ids, old.bundle.params(max_new_tokens=LONG))
            queued = old.engine.submit(ids, old.bundle.params(max_new_tokens=LONG))
            first = await anext(running)
            live = await manager.update(home.project, "bot", DeploymentChange(version=2))
            retired = asyncio.ensure_future(manager.wait_retired())
            # new requests go to the new version
            _, route, new = manager.language_model(home.project.id, "bot")
            assert route.version == 2 and new is not old and [r.version for r in live.routes] == [2]
            reply = new.engine.submit(ids, new.bundle.params(max_new_tokens=8))
            assert (await _text(reply))[0] == short_v2.text
            # the running and the queued streams finished on version 1, whole
            rest, reason = await _text(running)
            assert (first.text + rest, reason) == (long.text, "length")
            assert await _text(queued) == (long.text, "length")
            await retired
            with pytest.raises(QueueFull):  # then the retired engine closed
                old.engine.submit(ids, old.bundle.params())
            assert all(m is not old for m in manager._models.values())
            # a delete retires the new one too once the other deployment lets it go
            await manager.delete(home.project, "bot")
            await manager.delete(home.project, "v2")
            await manager.wait_retired()
            with pytest.raises(QueueFull):
                new.engine.submit(ids, new.bundle.params())
            assert manager._models == {}
        finally:
            await manager.close()

    asyncio.run(main())


def test_an_embedding_deployment_embeds_what_the_bundle_does(home: Home, bundles: Bundles) -> None:
    from kiln.errors import ConflictError, DataError
    from kiln.serve.deployments import NewDeployment
    from kiln.serve.lm import ServedEmbedder

    texts = ["a red car", "the blue sky", "a green apple on a table"]
    local = _load_embedder(bundles.embed)
    expected = local.embed(texts)

    async def main() -> None:
        manager = await _manager(home)
        try:
            live = await manager.create(home.project, NewDeployment(name="vec", model="embed"))
            assert live.task == "embedding"
            _, route, served = manager.embedder(home.project.id, "vec")
            assert isinstance(served, ServedEmbedder) and route.version == 1
            vectors = await served.embed_async(texts)
            assert vectors.dtype == np.float32 and vectors.shape == (3, served.dimensions)
            np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
            lengths = [len(local.tokenizer(t)["input_ids"]) for t in texts]
            assert served.count_tokens(texts) == sum(lengths) > len(texts)
            with pytest.raises(DataError, match=r"input\[1\]"):
                served.embed(["fine", 3])  # type: ignore[list-item]
            use = "deployment vec serves an embedding model; use /v1/embeddings"
            with pytest.raises(ConflictError, match=use):
                await manager.predict(home.project.id, "vec", [{"x": 1.0}])
            with pytest.raises(ConflictError, match="/v1/embeddings"):
                manager.language_model(home.project.id, "vec")
        finally:
            await manager.close()

    asyncio.run(main())


def test_language_model_deployments_are_restored_after_a_restart(
    home: Home, bundles: Bundles
) -> None:
    from kiln.serve.deployments import DeploymentChange, NewDeployment
    from kiln.store.deployments import DeploymentConfig

    expected = _load_lm(bundles.chat_v2).generate(PROMPT, max_new_tokens=12)
    vectors = _load_embedder(bundles.embed).embed([PROMPT])
    config = DeploymentConfig(max_batch_size=2, max_queue=3)

    async def first() -> None:
        manager = await _manager(home)
        try:
            spec = NewDeployment(name="bot", model="chat", version=1, config=config)
            await manager.create(home.project, spec)
            await manager.update(home.project, "bot", DeploymentChange(version=2))
            await manager.create(home.project, NewDeployment(name="vec", model="embed"))
        finally:
            await manager.close()

    async def restarted() -> None:
        manager = await _manager(home)
        try:
            assert manager.ready()
            live, route, served = manager.language_model(home.project.id, "bot")
            assert route.version == 2 and live.config == config
            # the deployment's batch size and queue bound are its engine's limits
            assert (served.engine.max_num_seqs, served.engine.max_queue) == (2, 3)
            ids = served.bundle.prompt_ids(PROMPT)
            reply = served.engine.submit(ids, served.bundle.params(max_new_tokens=12))
            assert (await _text(reply))[0] == expected.text
            _, _, embedder = manager.embedder(home.project.id, "vec")
            np.testing.assert_allclose(embedder.embed([PROMPT]), vectors, rtol=1e-5, atol=1e-6)
        finally:
            await manager.close()

    asyncio.run(first())
    asyncio.run(restarted())


def test_the_http_api_reports_the_task_and_predict_refuses_a_language_model(
    home: Home,
) -> None:
    """Through the real app (restored on start): the deployment's task, ``/readyz``,
    and 409s from predict and KServe v2 naming the OpenAI-compatible route."""
    from fastapi.testclient import TestClient

    from kiln.app import create_app
    from kiln.serve.deployments import NewDeployment

    async def deploy() -> None:
        manager = await _manager(home)
        try:
            await manager.create(home.project, NewDeployment(name="bot", model="chat"))
            await manager.create(home.project, NewDeployment(name="vec", model="embed"))
        finally:
            await manager.close()

    asyncio.run(deploy())
    key = "k" * 24
    home.services.static_key = key  # kiln serve's key: predict and read
    with TestClient(create_app(home.services.settings, services=home.services)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        assert client.get("/readyz").json() == {"ready": True}
        r = client.get("/api/v1/deployments/bot")
        assert r.status_code == 200, r.text
        assert r.json()["task"] == "generation" and r.json()["routes"][0]["version"] == 2
        assert client.get("/api/v1/deployments/vec").json()["task"] == "embedding"
        for name, route in (("bot", "/v1/chat/completions"), ("vec", "/v1/embeddings")):
            r = client.post(f"/api/v1/deployments/{name}/predict", json={"inputs": [{"x": 1}]})
            assert r.status_code == 409 and route in r.text, r.text
            body = {"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}
            r = client.post(f"/v2/models/{name}/infer", json=body)
            assert r.status_code == 409 and route in r.text, r.text
            r = client.get(f"/v2/models/{name}")
            assert r.status_code == 409 and route in r.text, r.text


def test_a_classic_deployment_refuses_the_language_model_accessors(
    tmp_path: Path, iris_bundle: Path
) -> None:
    from kiln.app import build_services
    from kiln.bundle import Bundle
    from kiln.errors import ConflictError
    from kiln.serve.deployments import NewDeployment
    from kiln.settings import Settings
    from kiln.standalone import register

    svc = build_services(Settings(home=tmp_path / "home"))
    project = register(svc, iris_bundle, Bundle.load(iris_bundle).meta, "iris")
    home = Home(svc, project, tmp_path / "cache")

    async def main() -> None:
        manager = await _manager(home)
        try:
            live = await manager.create(project, NewDeployment(name="iris", model="iris"))
            assert live.task == "classification"
            assert manager.classic(project.id, "iris") is live
            use = "serves a classification model; use /api/v1/deployments/iris/predict"
            with pytest.raises(ConflictError, match=use):
                manager.language_model(project.id, "iris")
            with pytest.raises(ConflictError, match=use):
                manager.embedder(project.id, "iris")
        finally:
            await manager.close()

    try:
        asyncio.run(main())
    finally:
        svc.db.dispose()
