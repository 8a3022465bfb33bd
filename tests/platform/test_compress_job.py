"""The compress job kind: a registered version in, each kept variant registered as a
new version whose parent is the version it was made from."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sklearn.datasets import load_iris

import kiln
from kiln.app import build_services, create_app
from kiln.jobs.worker import Worker
from kiln.server import bootstrap
from kiln.settings import Settings


@pytest.fixture
def platform(tmp_path: Path) -> Any:
    settings = Settings(home=tmp_path / "home", heartbeat_seconds=0.2)
    services = build_services(settings)
    key = bootstrap(services)
    client = TestClient(create_app(settings, services=services))
    client.headers["Authorization"] = f"Bearer {key}"
    worker = Worker(settings, db=services.db, store=services.store)
    yield client, worker
    services.db.dispose()


def _train(client: TestClient, worker: Worker) -> None:
    frame = load_iris(as_frame=True).frame
    upload = client.post(
        "/api/v1/datasets",
        files={"file": ("iris.csv", frame.to_csv(index=False).encode(), "text/csv")},
    )
    assert upload.status_code == 201, upload.text
    spec = {
        "name": "iris",
        "task": "classification",
        "data": {"source": upload.json()["ref"], "target": "target"},
        "model": {"type": "mlp", "hidden": [32]},
        "train": {"epochs": 30, "device": "cpu", "optimizer": {"name": "adam", "lr": 0.02}},
    }
    job = client.post("/api/v1/jobs", json={"kind": "train", "spec": spec})
    assert job.status_code == 201, job.text
    worker.run(until_idle=True)
    assert client.get(f"/api/v1/jobs/{job.json()['id']}").json()["state"] == "succeeded"


def test_compress_registers_variants_with_parents(platform: Any, tmp_path: Path) -> None:
    client, worker = platform
    _train(client, worker)
    spec = {
        "source": "model:iris@1",
        "steps": [
            {"prune": {"method": "structured", "amount": 0.5, "finetune_epochs": 5}},
            {"quantize": {"method": "int8_dynamic", "backend": "onnxruntime"}},
        ],
        "tolerance": {"metric": "accuracy", "max_drop": 0.5},
    }
    job = client.post("/api/v1/jobs", json={"kind": "compress", "spec": spec})
    assert job.status_code == 201, job.text
    worker.run(until_idle=True)
    done = client.get(f"/api/v1/jobs/{job.json()['id']}").json()
    assert done["state"] == "succeeded", done["error"]
    assert [v["version"] for v in done["result"]["variants"]] == [2, 3]

    v1, v2, v3 = (client.get(f"/api/v1/models/iris/versions/{n}").json() for n in (1, 2, 3))
    assert v2["parent_id"] == v1["id"] and v3["parent_id"] == v2["id"]
    assert v2["summary"]["variant"].endswith("prune")
    assert v3["summary"]["runtime"]["quantization"] == "int8_dynamic"
    assert v2["summary"]["parameters"] < v1["summary"]["parameters"]

    # the registered variant is a real bundle that names its registered parent
    archive = client.get("/api/v1/models/iris/versions/3/bundle")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        tar.extractall(tmp_path / "out", filter="data")
    bundle = kiln.load(tmp_path / "out" / "iris-v3")
    assert bundle.meta.lineage.parent.version == 2
    assert bundle.meta.lineage.parent.model == "iris"
    assert bundle.meta.lineage.parent.path is None
    rows = load_iris(as_frame=True).frame.drop(columns="target").head(5)
    assert len(bundle.predict(rows).predictions) == 5


def test_compress_spec_errors_name_the_field(platform: Any) -> None:
    client, worker = platform
    _train(client, worker)
    cases = [
        ({"source": "model:nope", "steps": [{"quantize": {}}]}, "spec.source"),
        ({"source": "/tmp/some/bundle", "steps": [{"quantize": {}}]}, "spec.source"),
        ({"source": "model:iris@7", "steps": [{"quantize": {}}]}, "spec.source"),
        ({"source": "model:iris", "steps": [{"quantise": {}}]}, "spec.steps.0"),
        ({"source": "model:iris", "steps": [{"quantize": {}}], "data": "x.csv"}, "spec.data"),
    ]
    for spec, field in cases:
        response = client.post("/api/v1/jobs", json={"kind": "compress", "spec": spec})
        assert response.status_code == 422, (spec, response.text)
        assert response.json()["error"]["field"].startswith(field), response.json()
    assert client.get("/api/v1/jobs", params={"state": "queued"}).json()["total"] == 0


def test_compress_past_tolerance_fails_but_keeps_earlier_variants(platform: Any) -> None:
    client, worker = platform
    _train(client, worker)
    spec = {
        "source": "model:iris",
        "steps": [
            {"quantize": {"method": "int8_dynamic", "backend": "onnxruntime"}},
            # a one-neuron student cannot stay within 0 of the teacher
            {"distill": {"student": {"type": "mlp", "hidden": [1]}, "epochs": 1}},
        ],
        "tolerance": {"metric": "accuracy", "max_drop": 0.0, "retries": 0},
    }
    job = client.post("/api/v1/jobs", json={"kind": "compress", "spec": spec})
    worker.run(until_idle=True)
    done = client.get(f"/api/v1/jobs/{job.json()['id']}").json()
    assert done["state"] == "failed"
    assert done["error"]["code"] == "tolerance_not_met"
    kept = done["result"]["variants"]
    assert len(kept) <= 1  # the int8 step may or may not have fitted within 0
    versions = client.get("/api/v1/models/iris/versions").json()
    assert versions["total"] == 1 + len(kept)


def test_a_version_trained_on_a_host_file_is_not_reread_by_a_server_compress_job(
    tmp_path: Path,
) -> None:
    """A bundle registered as it is (as `kiln serve` does) names the table it was trained
    on, a path of that machine; a compress job without data must not read it."""
    from kiln.standalone import register

    settings = Settings(home=tmp_path / "home", heartbeat_seconds=0.2)
    services = build_services(settings)
    key = bootstrap(services)
    table = tmp_path / "host-secret.csv"
    load_iris(as_frame=True).frame.to_csv(table, index=False)
    spec = {
        "name": "hosted",
        "task": "classification",
        "data": {"source": str(table), "target": "target"},
        "model": {"type": "mlp", "hidden": [8]},
        "train": {"epochs": 2, "device": "cpu"},
    }
    bundle = kiln.fit(spec)
    bundle.save(tmp_path / "hosted")
    register(services, tmp_path / "hosted", bundle.meta, "hosted")
    client = TestClient(create_app(settings, services=services))
    client.headers["Authorization"] = f"Bearer {key}"
    worker = Worker(settings, db=services.db, store=services.store)
    compress = {
        "source": "model:hosted@1",
        "steps": [{"quantize": {"method": "int8_dynamic", "backend": "onnxruntime"}}],
    }
    job = client.post("/api/v1/jobs", json={"kind": "compress", "spec": compress})
    assert job.status_code == 201, job.text
    table.unlink()  # had the worker read it, the error would say it is gone
    worker.run(until_idle=True)
    done = client.get(f"/api/v1/jobs/{job.json()['id']}").json()
    assert done["state"] == "failed", done
    assert done["error"]["field"] == "spec.data", done["error"]
    assert "host-secret" not in str(done)
    services.db.dispose()
