"""``kiln serve`` (a real process over one bundle) and ``kiln deployments`` (against a server)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import kiln
from cli.live_server import Platform
from kiln.cli.main import app
from kiln.client import Client
from support import free_port, kiln_env, start_process, stop_process, wait_for_http

runner = CliRunner()
KEY = "k" * 32


def iris_spec(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "task": "classification",
        "data": {"source": "sklearn:iris", "target": "target"},
        "model": {"type": "linear"},
        "train": {"epochs": 15, "batch_size": 16, "device": "cpu", "optimizer": {"lr": 0.05}},
    }


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    from sklearn.datasets import load_iris

    frame = load_iris(as_frame=True).frame.drop(columns="target")
    return frame.iloc[::15].to_dict(orient="records")  # 10 rows, every class


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kiln.fit(iris_spec("iris-serve")).save(tmp_path_factory.mktemp("bundle") / "iris")


# --- kiln serve -------------------------------------------------------------------


def test_serve_help_lists_its_options() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for option in ("--host", "--port", "--api-key", "--name", "--backend", "--max-batch-size"):
        assert option in result.stdout
    assert "127.0.0.1" in result.stdout and "KILN_SERVE_API_KEY" in result.stdout


def test_serve_refuses_bad_input_before_listening(bundle_dir: Path, tmp_path: Path) -> None:
    not_a_bundle = runner.invoke(app, ["serve", str(tmp_path), "--api-key", KEY])
    assert not_a_bundle.exit_code == 5, not_a_bundle.output
    assert "kiln.json" in not_a_bundle.stderr and "Traceback" not in not_a_bundle.output

    missing = runner.invoke(app, ["serve", str(tmp_path / "nope"), "--api-key", KEY])
    assert missing.exit_code == 6 and "not found" in missing.stderr

    short = runner.invoke(app, ["serve", str(bundle_dir), "--api-key", "short"])
    assert short.exit_code == 3 and "at least 16" in short.stderr

    bad_name = runner.invoke(app, ["serve", str(bundle_dir), "--name", "No Name", "--api-key", KEY])
    assert bad_name.exit_code == 3 and "deployment name" in bad_name.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        in_use = runner.invoke(app, ["serve", str(bundle_dir), "--port", port, "--api-key", KEY])
    assert in_use.exit_code == 12 and "already in use" in in_use.stderr


def test_a_deployment_that_fails_at_startup_exits_cleanly(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stops again, the error is the command's, the temporary home is gone."""
    from kiln.errors import SpecError

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise SpecError("image models cannot be deployed yet", field="model")

    monkeypatch.setattr("kiln.serve.deployments.ServedModel", refuse)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    args = ["serve", str(bundle_dir), "--port", "0", "--api-key", KEY]
    result = runner.invoke(app, args, env={"KILN_HOME": str(tmp_path / "unused")})
    assert result.exit_code == 3, result.output
    assert "image models cannot be deployed yet" in result.stderr
    assert "Traceback" not in result.output and "URL:" not in result.stdout
    assert list(temp.iterdir()) == []


def test_banner_shows_a_generated_key_once_and_working_examples(bundle_dir: Path) -> None:
    from kiln.bundle import Bundle
    from kiln.standalone import ServeOptions, banner, example_row, v2_example

    bundle = Bundle.load(bundle_dir)
    model = SimpleNamespace(backend_name="onnxruntime", parity=1e-7)
    live = SimpleNamespace(routes=[SimpleNamespace(batcher=SimpleNamespace(model=model))])
    options = ServeOptions(host="::1", port=9000)
    text = "\n".join(banner(options, "iris", bundle, live, "generated-key-123456"))  # type: ignore[arg-type]
    assert text.count("generated-key-123456") == 1 and "http://[::1]:9000" in text
    assert "/api/v1/deployments/iris/predict" in text and "/v2/models/iris/infer" in text
    row = example_row(bundle)
    assert list(row) == [c.name for c in bundle.meta.input_schema]
    assert bundle.predict([row]).predictions  # the example is a row the model accepts
    tensor = v2_example(bundle, row)["inputs"][0]
    assert tensor["shape"] == [1, 4] and tensor["datatype"] == "FP32"
    given = "\n".join(banner(options, "iris", bundle, live, None))  # type: ignore[arg-type]
    assert "the one given" in given


def _serve(bundle_dir: Path, port: int, temp: Path, log: Path) -> subprocess.Popen[bytes]:
    args = ["serve", str(bundle_dir), "--port", str(port), "--api-key", KEY]
    command = [sys.executable, "-m", "kiln.cli.main", *args]
    return start_process(command, log, kiln_env(TMPDIR=str(temp)))


@pytest.mark.e2e
def test_kiln_serve_process_serves_one_bundle_with_one_key(
    bundle_dir: Path, rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    temp, log = tmp_path / "tmp", tmp_path / "serve.log"
    temp.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(bundle_dir, port, temp, log)
    try:
        wait_for_http(f"{url}/readyz", proc=proc, log=log, timeout=120)
        homes = [p.name for p in temp.iterdir() if p.name.startswith("kiln-serve-")]
        assert len(homes) == 1

        auth = {"Authorization": f"Bearer {KEY}"}
        local = kiln.load(str(bundle_dir)).predict(rows)
        with httpx.Client(base_url=url, timeout=30) as http:
            answer = http.post(
                "/api/v1/deployments/iris-serve/predict", json={"inputs": rows}, headers=auth
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["model"] == "iris-serve" and body["version"] == 1
            assert body["predictions"] == list(local.predictions)
            np.testing.assert_allclose(
                body["probabilities"], np.asarray(local.probabilities), atol=1e-4
            )

            no_key = http.post("/api/v1/deployments/iris-serve/predict", json={"inputs": rows})
            assert no_key.status_code == 401
            wrong = {"Authorization": "Bearer " + "x" * 32}
            assert http.get("/api/v1/deployments", headers=wrong).status_code == 401
            # predict and read only: no training, deploying or key management
            job = {"kind": "train", "spec": iris_spec("x")}
            assert http.post("/api/v1/jobs", json=job, headers=auth).status_code == 403
            assert http.get("/api/v1/keys", headers=auth).status_code == 403
            deploy = {"name": "again", "model": "iris-serve"}
            assert http.post("/api/v1/deployments", json=deploy, headers=auth).status_code == 403
            listed = http.get("/api/v1/deployments", headers=auth).json()
            assert [d["name"] for d in listed] == ["iris-serve"]

            matrix = [[row[c] for c in row] for row in rows]
            tensor = {"name": "input", "shape": [len(rows), 4], "datatype": "FP32", "data": matrix}
            infer = http.post(
                "/v2/models/iris-serve/infer", json={"inputs": [tensor]}, headers=auth
            )
            assert infer.status_code == 200, infer.text
            outputs = {o["name"]: o for o in infer.json()["outputs"]}
            assert outputs["predictions"]["data"] == list(local.predictions)
            assert http.get("/v2/models/iris-serve", headers=auth).status_code == 200
            metrics = http.get("/metrics", headers=auth)
            assert metrics.status_code == 200 and "kiln_requests_total" in metrics.text
            assert http.get("/healthz").json()["status"] == "ok"
    finally:
        stopping = time.monotonic()
        code = stop_process(proc, signal.SIGINT)
    printed = log.read_text()
    assert code == 0, printed
    assert time.monotonic() - stopping < 30
    assert "kiln serve stopped" in printed and "Traceback" not in printed
    assert f"URL:         {url}" in printed and "deployment:  iris-serve" in printed
    assert KEY not in printed  # a key given is never echoed
    assert [p for p in temp.iterdir() if p.name.startswith("kiln-serve-")] == []


# --- kiln deployments -------------------------------------------------------------


@pytest.fixture(scope="module")
def model(platform: Platform) -> str:
    """Two versions of one model on the server."""
    with Client(platform.url, platform.admin_key) as client:
        jobs = [client.jobs.submit(iris_spec("iris-cli")) for _ in range(2)]
        for job in jobs:
            assert client.jobs.wait(job["id"], timeout=180, poll=0.1)["state"] == "succeeded"
    return "iris-cli"


@pytest.fixture
def tables(rows: list[dict[str, Any]], tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    csv, jsonl = tmp_path / "rows.csv", tmp_path / "rows.jsonl"
    pd.DataFrame(rows).to_csv(csv, index=False)
    pd.DataFrame(rows).to_json(jsonl, orient="records", lines=True)
    yield csv, jsonl


def kiln_cli(env: dict[str, str | None], *args: str) -> Any:
    return runner.invoke(app, list(args), env=env)


@pytest.mark.e2e
def test_deployments_commands(
    env: dict[str, str | None], model: str, tables: tuple[Path, Path], tmp_path: Path
) -> None:
    csv, jsonl = tables
    created = kiln_cli(
        env, "deployments", "create", "iris", "--model", model, "--version", "1",
        "--max-batch-size", "8", "--json",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    row = json.loads(created.stdout)
    assert row["name"] == "iris" and row["max_batch_size"] == 8
    assert [(r["version"], r["weight"]) for r in row["routes"]] == [(1, 100)]

    plain = kiln_cli(env, "deployments", "create", "iris-b", "-m", model, "--backend", "torch")
    assert plain.exit_code == 0, plain.output
    assert f"deployment iris-b: model {model} v2 on torch, ready" in plain.stdout

    listed = kiln_cli(env, "deployments", "list")
    assert listed.exit_code == 0, listed.output
    assert "iris-b" in listed.stdout and "8 rows / 5 ms" in listed.stdout

    shown = kiln_cli(env, "deployments", "show", "iris")
    assert shown.exit_code == 0, shown.output
    assert "v1" in shown.stdout and "100%" in shown.stdout and "up to 8 rows" in shown.stdout

    predicted = kiln_cli(env, "deployments", "predict", "iris", str(csv))
    assert predicted.exit_code == 0, predicted.output
    assert f"{model} v1: 10 prediction(s)" in predicted.stdout
    as_json = kiln_cli(env, "deployments", "predict", "iris", str(jsonl), "--json")
    assert as_json.exit_code == 0, as_json.output
    answer = json.loads(as_json.stdout)
    assert len(answer["predictions"]) == 10 and answer["version"] == 1
    assert str(answer["predictions"][0]) in predicted.stdout

    swapped = kiln_cli(env, "deployments", "swap", "iris", "2")
    assert swapped.exit_code == 0, swapped.output
    assert f"model {model} v2" in swapped.stdout

    canary = kiln_cli(env, "deployments", "canary", "iris", "--route", "1=90", "--route", "2=10")
    assert canary.exit_code == 0, canary.output
    assert "v1 90%, v2 10%" in canary.stdout
    got = json.loads(kiln_cli(env, "deployments", "show", "iris", "--json").stdout)
    assert [(r["version"], r["weight"]) for r in got["routes"]] == [(1, 90), (2, 10)]

    bad_route = kiln_cli(env, "deployments", "canary", "iris", "--route", "1:90")
    assert bad_route.exit_code == 3 and "VERSION=WEIGHT" in bad_route.stderr

    missing = tmp_path / "missing.csv"
    pd.read_csv(csv).drop(columns="petal width (cm)").to_csv(missing, index=False)
    bad_rows = kiln_cli(env, "deployments", "predict", "iris", str(missing))
    assert bad_rows.exit_code == 4 and "petal width (cm)" in bad_rows.stderr

    for name in ("iris", "iris-b"):
        deleted = kiln_cli(env, "deployments", "delete", name)
        assert deleted.exit_code == 0 and f"deleted deployment {name}" in deleted.stdout
    gone = kiln_cli(env, "deployments", "show", "iris")
    assert gone.exit_code == 6 and "not found" in gone.stderr
    assert json.loads(kiln_cli(env, "deployments", "list", "--json").stdout) == []


def test_deployments_predict_sends_missing_values_the_model_imputes(
    platform: Platform, env: dict[str, str | None], tmp_path: Path
) -> None:
    """Empty cells of the table are missing values: imputed as ``kiln predict`` imputes
    them where the model's preprocessing fills them, a 422 naming the cell where it
    drops them."""
    from kiln.standalone import register

    rng = np.random.default_rng(1)
    train = pd.DataFrame({"a": rng.normal(size=60), "b": rng.normal(size=60)})
    train["target"] = (train["a"] > train["b"]).astype(int)
    train.loc[::7, "a"] = np.nan
    source = tmp_path / "train.csv"
    train.to_csv(source, index=False)
    gaps = tmp_path / "gaps.csv"
    gaps.write_text("a,b\n0.5,\n,-1.0\n1.5,0.2\n")
    for missing in ("mean", "drop"):
        name = f"gaps-{missing}"
        spec = {
            "name": name,
            "task": "classification",
            "data": {"source": str(source), "target": "target"},
            "model": {"type": "linear"},
            "train": {"epochs": 3, "device": "cpu"},
        }
        spec["data"]["preprocessing"] = {"missing": missing}  # type: ignore[index]
        bundle = kiln.fit(spec, out=tmp_path / name)
        register(platform.services, tmp_path / name, bundle.meta, name)
        created = kiln_cli(env, "deployments", "create", name, "--model", name, "--version", "1")
        assert created.exit_code == 0, created.output
        predicted = kiln_cli(env, "deployments", "predict", name, str(gaps), "--json")
        if missing == "mean":
            assert predicted.exit_code == 0, predicted.output
            expected = bundle.predict(pd.read_csv(gaps))
            answer = json.loads(predicted.stdout)
            assert answer["predictions"] == expected.predictions
            np.testing.assert_allclose(answer["probabilities"], expected.probabilities, atol=1e-6)
        else:
            assert predicted.exit_code == 4, predicted.output
            assert "inputs[0].b" in predicted.stderr and "missing" in predicted.stderr
        assert kiln_cli(env, "deployments", "delete", name).exit_code == 0
