"""kiln.Client's deployments group against a real server with a worker training the models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

import kiln
from cli.live_server import Platform, running_platform
from kiln.client import Client, records
from kiln.errors import (
    ConflictError,
    DataError,
    DeadlineExceeded,
    ForbiddenError,
    NotFoundError,
    QueueFull,
    ServiceError,
    SpecError,
)

SPEC: dict[str, Any] = {
    "name": "iris-dep",
    "task": "classification",
    "data": {"source": "sklearn:iris", "target": "target"},
    "model": {"type": "linear"},
    "train": {"epochs": 15, "batch_size": 16, "device": "cpu", "optimizer": {"lr": 0.05}},
}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with running_platform(tmp_path_factory.mktemp("kiln-home")) as running:
        yield running


@pytest.fixture(scope="module")
def admin(platform: Platform) -> Iterator[Client]:
    with Client(platform.url, platform.admin_key, project="default") as client:
        yield client


@pytest.fixture(scope="module")
def trained(admin: Client) -> str:
    """Two versions of one model, trained by the server's worker."""
    jobs = [admin.jobs.submit(SPEC) for _ in range(2)]
    for job in jobs:
        done = admin.jobs.wait(job["id"], timeout=180, poll=0.1)
        assert done["state"] == "succeeded", done
    return str(SPEC["name"])


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    from sklearn.datasets import load_iris

    frame = load_iris(as_frame=True).frame.drop(columns="target")
    return frame.iloc[::10].to_dict(orient="records")  # 15 rows, every class


@pytest.mark.e2e
def test_deploy_predict_swap_canary_delete(
    admin: Client, trained: str, rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    created = admin.deployments.create("iris", trained, 1, max_batch_size=8, max_delay_ms=2)
    assert created["name"] == "iris" and created["model"] == trained
    assert created["state"] == "ready" and created["max_batch_size"] == 8
    assert [(r["version"], r["weight"]) for r in created["routes"]] == [(1, 100)]
    assert created["routes"][0]["backend"] in ("onnxruntime", "torch")
    assert [d["name"] for d in admin.deployments.list()] == ["iris"]
    assert admin.deployments.get("iris") == created

    # the server's predictions are the bundle's own
    local = kiln.load(str(admin.models.download(trained, 1, dest=tmp_path))).predict(rows)
    answer = admin.deployments.predict("iris", rows)
    assert answer["model"] == trained and answer["version"] == 1
    assert answer["predictions"] == list(local.predictions)
    assert answer["labels"] == list(local.labels or [])
    np.testing.assert_allclose(answer["probabilities"], np.asarray(local.probabilities), atol=1e-4)
    # a DataFrame is sent as its records
    assert (
        admin.deployments.predict("iris", pd.DataFrame(rows))["predictions"]
        == (answer["predictions"])
    )

    swapped = admin.deployments.update("iris", version=2)
    assert [(r["version"], r["weight"]) for r in swapped["routes"]] == [(2, 100)]
    assert swapped["max_batch_size"] == 8  # settings not named are kept
    assert admin.deployments.predict("iris", rows[:2])["version"] == 2

    canary = admin.deployments.update("iris", routes={1: 90, 2: 10})
    assert [(r["version"], r["weight"]) for r in canary["routes"]] == [(1, 90), (2, 10)]
    got = admin.deployments.get("iris")
    assert [(r["version"], r["weight"]) for r in got["routes"]] == [(1, 90), (2, 10)]
    assert {admin.deployments.predict("iris", rows[:1])["version"] for _ in range(5)} <= {1, 2}
    rollback = admin.deployments.update("iris", routes=[{"version": 1, "weight": 1}])
    assert [r["version"] for r in rollback["routes"]] == [1]

    admin.deployments.delete("iris")
    assert admin.deployments.list() == []
    with pytest.raises(NotFoundError, match="deployment 'iris' not found"):
        admin.deployments.get("iris")
    with pytest.raises(NotFoundError):
        admin.deployments.predict("iris", rows)


@pytest.mark.e2e
def test_deployment_errors_map_to_kiln_errors(
    platform: Platform, admin: Client, trained: str, rows: list[dict[str, Any]]
) -> None:
    with pytest.raises(SpecError, match="model 'nope' not found") as no_model:
        admin.deployments.create("nope", "nope")
    assert no_model.value.field == "model"
    with pytest.raises(SpecError, match="no version '9'") as no_version:
        admin.deployments.create("iris-e", trained, 9)
    assert no_version.value.field == "version"
    with pytest.raises(SpecError) as bad_name:
        admin.deployments.create("Not A Name", trained)
    assert bad_name.value.field == "name"

    admin.deployments.create("iris-e", trained)  # latest
    try:
        assert admin.deployments.get("iris-e")["routes"][0]["version"] == 2
        with pytest.raises(ConflictError, match="already exists"):
            admin.deployments.create("iris-e", trained)
        missing = [{k: v for k, v in rows[0].items() if k != "petal width (cm)"}]
        with pytest.raises(DataError) as data_error:
            admin.deployments.predict("iris-e", missing)
        assert data_error.value.field == "inputs[0].petal width (cm)"

        # a request that waits past timeout_ms is a DeadlineExceeded, a ServiceError
        admin.deployments.update("iris-e", timeout_ms=1, max_delay_ms=1000, max_batch_size=4096)
        with pytest.raises(DeadlineExceeded) as timeout:
            admin.deployments.predict("iris-e", rows[:1])
        assert isinstance(timeout.value, ServiceError)
        assert timeout.value.code == "timeout" and timeout.value.exit_code == 19

        # a key with the predict scope only predicts
        issued = admin.keys.create(["predict"], project="default", name="predictor")
        with Client(platform.url, issued["key"]) as predictor:
            admin.deployments.update("iris-e", timeout_ms=10_000, max_delay_ms=1)
            assert len(predictor.deployments.predict("iris-e", rows[:3])["predictions"]) == 3
            with pytest.raises(ForbiddenError, match="'deploy' scope"):
                predictor.deployments.create("iris-p", trained)
            with pytest.raises(ForbiddenError, match="'read' scope"):
                predictor.deployments.list()
    finally:
        admin.deployments.delete("iris-e")


def test_overloaded_is_a_service_error_with_the_servers_message() -> None:
    def overloaded(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "overloaded", "message": "the queue is full", "field": None}}
        return httpx.Response(503, json=body, headers={"Retry-After": "3"})

    client = Client("http://kiln.test", "k", transport=httpx.MockTransport(overloaded))
    with client, pytest.raises(ServiceError, match="the queue is full") as exc:
        client.deployments.predict("iris", [{"x": 1.0}])
    assert isinstance(exc.value, QueueFull)
    assert exc.value.code == "overloaded" and exc.value.exit_code == 18
    assert exc.value.retry_after == 3  # the server's Retry-After
    assert exc.value.to_dict() == {
        "code": "overloaded",
        "message": "the queue is full",
        "field": None,
    }


def test_records_of_rows() -> None:
    frame = pd.DataFrame({"x": [1.0, float("nan")], "c": ["a", None], "n": [1, 2]})
    assert records(frame) == [{"x": 1.0, "c": "a", "n": 1}, {"x": None, "c": None, "n": 2}]
    assert records([{"x": 1}]) == [{"x": 1}]
    with pytest.raises(TypeError, match="not one row"):
        records({"x": 1})
