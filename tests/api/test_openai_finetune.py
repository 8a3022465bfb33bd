"""OpenAI's Files and fine-tuning APIs, called with the official ``openai`` client against
a real uvicorn server and a kiln worker (in a thread): a chat JSONL uploaded as a file,
a LoRA fine-tune of a tiny random Llama from the catalog, its events and checkpoint,
and the fine-tuned model answering in /v1/chat/completions (deployed on first use)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select

from kiln.app import build_services, create_app
from kiln.jobs.worker import Worker
from kiln.server import bootstrap
from kiln.services import Services
from kiln.settings import Settings
from kiln.store.tables import AuditEvent, Dataset, ModelVersion
from support import serve_app, tiny_bpe, tiny_llama, wait_for, write_chats

BASE = "tiny-llama"
MESSAGES: list[Any] = [{"role": "user", "content": "I want a red pen. Which colour?"}]


@dataclass
class Server:
    url: str
    svc: Services
    settings: Settings
    admin: str
    key: str  # project default: read, train, predict
    reader: str  # project default: read only
    chats: bytes

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0)

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.admin}"}
        return httpx.request(method, f"{self.url}/api/v1{path}", headers=headers, **kwargs)

    def work(self) -> threading.Thread:
        """A worker running every queued job, in a thread (joined by the caller)."""
        worker = Worker(self.settings, db=self.svc.db, store=self.svc.store)
        thread = threading.Thread(target=worker.run, kwargs={"until_idle": True}, daemon=True)
        thread.start()
        return thread

    def count(self, table: Any) -> int:
        with self.svc.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(table)) or 0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("openai-ft")
    chats = write_chats(root / "chats.jsonl", n=16)
    tok = tiny_bpe(chats.read_text().splitlines())
    tiny_llama(tok).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    settings = Settings(home=root / "home", rate_limit_api="off", rate_limit_inference="off")
    svc = build_services(settings)
    admin = bootstrap(svc)
    assert admin is not None
    app = create_app(settings, services=svc)
    try:
        with serve_app(app) as url:
            made = Server(url, svc, settings, admin, "", "", chats.read_bytes())
            r = made.api("POST", "/base-models", json={"name": BASE, "source": str(root / "llama")})
            assert r.status_code == 201, r.text
            keys = []
            for scopes in (["read", "train", "predict"], ["read"]):
                body = {"project": "default", "scopes": scopes}
                r = made.api("POST", "/keys", json=body)
                assert r.status_code == 201, r.text
                keys.append(r.json()["key"])
            made.key, made.reader = keys
            yield made
    finally:
        svc.db.dispose()


@pytest.fixture(scope="module")
def training_file(server: Server) -> str:
    uploaded = server.client().files.create(file=("chats.jsonl", server.chats), purpose="fine-tune")
    assert uploaded.id.startswith("file-ds_")
    assert (uploaded.purpose, uploaded.status, uploaded.filename) == (
        "fine-tune",
        "processed",
        "chats.jsonl",
    )
    assert uploaded.bytes == len(server.chats)
    return uploaded.id


def test_a_file_is_a_dataset_listed_and_kept(server: Server, training_file: str) -> None:
    client = server.client()
    assert client.files.retrieve(training_file).bytes == len(server.chats)
    assert training_file in [f.id for f in client.files.list()]
    with server.svc.db.session() as s:
        row = s.get(Dataset, training_file.removeprefix("file-"))
        assert row is not None and row.rows == 16
        assert server.svc.store.get_bytes(row.artifact_key) == server.chats
    with pytest.raises(openai.BadRequestError, match="immutable") as refused:
        client.files.delete(training_file)
    assert refused.value.code == "conflict"
    assert client.files.retrieve(training_file).id == training_file  # still there
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-ds_nothing")


def test_a_file_that_is_not_chat_jsonl_is_refused_naming_the_line(server: Server) -> None:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    good = json.dumps({"messages": chat})
    no_answer = json.dumps({"messages": chat[:1]})
    before = server.count(Dataset)
    lines = [good, no_answer]
    with pytest.raises(openai.BadRequestError, match="line 2") as refused:
        server.client().files.create(
            file=("bad.jsonl", "\n".join(lines).encode()), purpose="fine-tune"
        )
    assert refused.value.param == "file"
    assert "assistant" in str(refused.value.message)
    assert "bad.jsonl" in str(refused.value.message)  # not the server's temporary copy
    with pytest.raises(openai.BadRequestError, match="line 1"):
        server.client().files.create(file=("worse.jsonl", b"{not json\n"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as purpose:
        server.client().files.create(file=("x.jsonl", good.encode()), purpose="batch")
    assert purpose.value.param == "purpose"
    with pytest.raises(openai.PermissionDeniedError):  # uploading needs the train scope
        server.client(server.reader).files.create(
            file=("chats.jsonl", server.chats), purpose="fine-tune"
        )
    assert server.count(Dataset) == before  # nothing stored


def test_an_unknown_base_model_or_a_validation_file_is_refused(
    server: Server, training_file: str
) -> None:
    jobs = server.client().fine_tuning.jobs
    with pytest.raises(openai.NotFoundError) as unknown:
        jobs.create(model="no-such-base", training_file=training_file)
    assert unknown.value.param == "model"
    assert "no-such-base" in str(unknown.value.message)
    with pytest.raises(openai.NotFoundError) as validation:
        jobs.create(model=BASE, training_file=training_file, validation_file="file-ds_nothing")
    assert validation.value.param == "validation_file"
    with pytest.raises(openai.NotFoundError) as missing:
        jobs.create(model=BASE, training_file="file-ds_nothing")
    assert missing.value.param == "training_file"
    with pytest.raises(openai.PermissionDeniedError):  # fine-tuning needs the train scope
        server.client(server.reader).fine_tuning.jobs.create(
            model=BASE, training_file=training_file
        )


def test_cancelling_a_queued_job_cancels_it(server: Server, training_file: str) -> None:
    jobs = server.client().fine_tuning.jobs
    job = jobs.create(model=BASE, training_file=training_file)
    assert job.status == "queued"
    assert job.hyperparameters.n_epochs == 3  # auto
    cancelled = jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert jobs.retrieve(job.id).status == "cancelled"
    assert cancelled.fine_tuned_model is None
    with pytest.raises(openai.BadRequestError):  # already over
        jobs.cancel(job.id)


def test_a_fine_tune_trains_lists_its_events_and_answers_chat(
    server: Server, training_file: str
) -> None:
    client = server.client()
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=training_file,
        hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 5},
        suffix="colours",
        seed=7,
    )
    assert job.id.startswith("ftjob-job_") and job.status == "queued"
    assert (job.seed, job.model, job.training_file) == (7, BASE, training_file)
    assert job.hyperparameters.learning_rate_multiplier == 5
    newest = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in newest.data] == [job.id] and newest.has_more
    older = client.fine_tuning.jobs.list(limit=1, after=job.id).data
    assert len(older) == 1 and older[0].id != job.id

    worker = server.work()

    def finished() -> Any:
        got = client.fine_tuning.jobs.retrieve(job.id)
        return got if got.status in ("succeeded", "failed", "cancelled") else None

    done = wait_for(finished, timeout=120, interval=0.2, what="the fine-tune to finish")
    worker.join(60)
    assert done.status == "succeeded", done.error
    kiln_job = job.id.removeprefix("ftjob-")
    assert done.fine_tuned_model == f"ft:{BASE}:colours:{kiln_job}"
    assert done.trained_tokens is not None and done.trained_tokens > 0
    assert done.finished_at is not None and done.error is None

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.message.split(":")[0] for e in metrics] == ["Step 2/2", "Step 1/2"]  # newest first
    assert all("training loss=" in e.message for e in metrics)
    assert any(e.type == "message" and "succeeded" in e.message for e in events)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == [done.fine_tuned_model]
    assert checkpoints[0].step_number == 2 and checkpoints[0].metrics.train_loss is not None

    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    answer = client.chat.completions.create(
        model=done.fine_tuned_model, messages=MESSAGES, max_tokens=4
    )
    assert answer.model == done.fine_tuned_model
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert isinstance(answer.choices[0].message.content, str)
    again = client.completions.create(model=done.fine_tuned_model, prompt="red", max_tokens=2)
    assert again.usage is not None and again.usage.completion_tokens > 0

    # deployed once, under the registered (path-safe) name; lineage and audit as any job's
    name = f"ft-{BASE}-colours-{kiln_job.removeprefix('job_')}"
    deployments = server.api("GET", "/deployments").json()
    assert [d["name"] for d in deployments] == [name]
    with server.svc.db.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.job_id == kiln_job))
        assert version is not None
        assert version.dataset_id == training_file.removeprefix("file-")
        actions = set(s.scalars(select(AuditEvent.action)))
    assert {"openai.files.create", "openai.fine_tuning.create", "deployments.create"} <= actions
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=f"ft:{BASE}:other:{kiln_job}", messages=MESSAGES, max_tokens=2
        )


VALIDATION_CHATS = [
    ("Is the sky blue or green?", "blue"),
    ("Pick a colour for grass.", "green"),
    ("Which colour is a ripe tomato?", "red"),
]


def _other_project(server: Server) -> openai.OpenAI:
    """A client acting on project ``other`` (the global admin key, with OpenAI-Project)."""
    r = server.api("POST", "/projects", json={"name": "other"})
    assert r.status_code in (201, 409), r.text
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=server.admin, project="other", max_retries=0
    )


def test_a_validation_file_of_another_project_is_a_404(server: Server, training_file: str) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    theirs = _other_project(server).files.create(
        file=("theirs.jsonl", json.dumps(chat).encode()), purpose="fine-tune"
    )
    with pytest.raises(openai.NotFoundError) as refused:
        server.client().fine_tuning.jobs.create(
            model=BASE, training_file=training_file, validation_file=theirs.id
        )
    assert refused.value.param == "validation_file"
    assert "validation_file" in str(refused.value.message)


def test_a_fine_tune_with_a_validation_file_reports_validation_loss(
    server: Server, training_file: str
) -> None:
    from kiln.bundle import META_FILE
    from kiln.serve.openai_finetune import Hyperparameters, fine_tune_spec, resolve
    from kiln.serve.openai_schemas import Model

    client = server.client()
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Answer with the colour only."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a},
                ]
            }
        )
        for q, a in VALIDATION_CHATS
    ]
    validation = client.files.create(
        file=("chats.jsonl", "\n".join(lines).encode()), purpose="fine-tune"
    )  # the training file's name: the worker keeps the two copies apart
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=training_file,
        validation_file=validation.id,
        hyperparameters={"n_epochs": 2, "batch_size": 8},
        seed=3,
    )
    assert (job.training_file, job.validation_file) == (training_file, validation.id)
    # on the server a validation set is a dataset: a path names a file of the server
    local = fine_tune_spec(
        name="local-validation",
        base=BASE,
        dataset_id=training_file.removeprefix("file-"),
        hp=resolve(Hyperparameters(n_epochs=1)),
        seed=0,
    )
    data = local["data"]
    assert isinstance(data, dict)
    data["validation"] = __file__
    submitted = server.api("POST", "/jobs", json={"kind": "train", "spec": local})
    assert submitted.status_code == 422, submitted.text  # refused at submission, no job
    assert submitted.json()["error"]["field"] == "spec.data.validation"

    worker = server.work()

    def finished() -> Any:
        got = client.fine_tuning.jobs.retrieve(job.id)
        return got if got.status in ("succeeded", "failed", "cancelled") else None

    done = wait_for(finished, timeout=120, interval=0.2, what="the fine-tune to finish")
    worker.join(60)
    assert done.status == "succeeded", done.error
    assert done.validation_file == validation.id

    metrics = [
        e
        for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data
        if e.type == "metrics"
    ]
    assert len(metrics) == 2
    for event in metrics:
        assert ", validation loss=" in event.message
        assert isinstance(event.data, dict) and event.data["valid_loss"] > 0
    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert checkpoint.metrics.valid_loss is not None and checkpoint.metrics.valid_loss > 0

    kiln_job = job.id.removeprefix("ftjob-")
    with server.svc.db.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.job_id == kiln_job))
        assert version is not None
        assert version.dataset_id == training_file.removeprefix("file-")  # the training data
        manifest = json.loads(server.svc.store.get_bytes(f"{version.artifact_key}/{META_FILE}"))
    # the lineage names the datasets, not the worker's copies; val: exactly that file
    assert manifest["lineage"]["spec"]["data"]["validation"] == "dataset:" + validation.id[5:]
    assert manifest["lineage"]["split"]["val"] == len(VALIDATION_CHATS)
    assert manifest["metrics"]["val"]["rows"] == len(VALIDATION_CHATS)
    assert manifest["training"]["history"][-1]["val_loss"] == pytest.approx(
        checkpoint.metrics.valid_loss
    )

    # GET /v1/models/{ft:...}: the object the list shows; another project's is a 404
    assert done.fine_tuned_model is not None
    listed = [m for m in client.models.list() if m.id == done.fine_tuned_model]
    got = server.client(server.reader).models.retrieve(done.fine_tuned_model)
    assert Model.model_validate(got.model_dump()) == Model.model_validate(listed[0].model_dump())
    assert got.owned_by == "default"
    with pytest.raises(openai.NotFoundError):
        _other_project(server).models.retrieve(done.fine_tuned_model)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(f"ft:{BASE}:other:{kiln_job}")


def test_a_file_over_the_upload_limit_is_a_413(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    settings = Settings(home=tmp_path / "home", max_upload_mb=0.001)  # about 1 KiB
    svc = build_services(settings)
    admin = bootstrap(svc)
    assert admin is not None
    with TestClient(create_app(settings, services=svc)) as client:
        chat = {
            "messages": [
                {"role": "user", "content": "x" * 2000},
                {"role": "assistant", "content": "y"},
            ]
        }
        r = client.post(
            "/v1/files",
            headers={"Authorization": f"Bearer {admin}"},
            files={"file": ("big.jsonl", json.dumps(chat).encode(), "application/jsonl")},
            data={"purpose": "fine-tune"},
        )
    assert r.status_code == 413, r.text
    with svc.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 0
    svc.db.dispose()
