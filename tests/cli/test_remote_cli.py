"""kiln projects|keys|datasets|jobs|models against a real server with a worker."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import kiln
from cli.live_server import Platform
from kiln.cli.main import app
from support import free_port

runner = CliRunner()


def kiln_cli(env: dict[str, str | None], *args: str) -> Any:
    return runner.invoke(app, list(args), env=env)


@pytest.fixture(scope="module")
def wine_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.datasets import load_wine

    path = tmp_path_factory.mktemp("data") / "wine.csv"
    load_wine(as_frame=True).frame.to_csv(path, index=False)
    return path


def write_spec(tmp_path: Path, name: str, target: str = "target", epochs: int = 3) -> Path:
    spec = {
        "name": name,
        "task": "classification",
        "data": {"target": target},  # the source is the table given with --data
        "model": {"type": "mlp", "hidden": [8]},
        "train": {"epochs": epochs, "batch_size": 32, "device": "cpu"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_datasets_upload_import_list_show(
    env: dict[str, str | None], platform: Platform, wine_csv: Path
) -> None:
    uploaded = kiln_cli(env, "datasets", "upload", str(wine_csv), "--name", "wine", "--json")
    assert uploaded.exit_code == 0, uploaded.output
    row = json.loads(uploaded.stdout)
    assert row["rows"] == 178 and row["name"] == "wine"

    listed = kiln_cli(env, "datasets", "list")
    assert listed.exit_code == 0, listed.output
    assert row["id"] in listed.stdout and "178" in listed.stdout

    shown = kiln_cli(env, "datasets", "show", row["ref"])
    assert shown.exit_code == 0, shown.output
    assert "alcohol" in shown.stdout and f"data.source: {row['ref']}" in shown.stdout

    table = kiln_cli(env, "datasets", "upload", str(wine_csv))
    assert table.exit_code == 0, table.output
    assert "178 rows, 14 columns" in table.stdout

    root = platform.services.settings.data_roots[0]
    (root / "wine.csv").write_bytes(wine_csv.read_bytes())
    imported = kiln_cli(env, "datasets", "import", str(root / "wine.csv"), "--name", "wine-imp")
    assert imported.exit_code == 0, imported.output
    assert "178 rows" in imported.stdout

    missing = kiln_cli(env, "datasets", "show", "ds_0000")
    assert missing.exit_code == 6 and "not found" in missing.stderr


def test_submit_follow_trains_and_registers_a_version(
    env: dict[str, str | None], wine_csv: Path, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, "wine-cli")
    result = kiln_cli(env, "jobs", "submit", str(spec), "--data", str(wine_csv), "--follow")
    assert result.exit_code == 0, result.output
    assert re.search(r"succeeded: model wine-cli version 1", result.stdout), result.stdout
    assert "held-out metrics" in result.stdout and "accuracy" in result.stdout
    # the progress bar (stderr) ends at the last epoch, with the loss and a validation metric
    assert "3/3 succeeded loss" in result.stderr and "val_accuracy" in result.stderr
    job_id = re.search(r"job (job_[0-9a-f]+) succeeded", result.stdout).group(1)  # type: ignore[union-attr]

    models = kiln_cli(env, "models", "list", "--json")
    assert models.exit_code == 0, models.output
    assert {"name": "wine-cli", "latest_version": 1}.items() <= next(
        m for m in json.loads(models.stdout)["items"] if m["name"] == "wine-cli"
    ).items()

    versions = kiln_cli(env, "models", "versions", "wine-cli")
    assert versions.exit_code == 0 and "v1" in versions.stdout and job_id in versions.stdout
    shown = kiln_cli(env, "models", "show", "wine-cli", "1")
    assert shown.exit_code == 0 and "held-out metrics" in shown.stdout

    alias = kiln_cli(env, "models", "alias", "wine-cli", "production", "1")
    assert alias.exit_code == 0, alias.output
    assert "production → v1" in alias.stdout

    out = tmp_path / "models"
    download = kiln_cli(env, "models", "download", "wine-cli", "production", "--out", str(out))
    assert download.exit_code == 0, download.output
    bundle = kiln.load(str(out / "wine-cli-v1"))
    rows = pd.read_csv(wine_csv).drop(columns=["target"]).head(4)
    assert len(bundle.predict(rows).predictions) == 4
    again = kiln_cli(env, "models", "download", "wine-cli", "--out", str(out))
    assert again.exit_code == 12 and "already exists" in again.stderr

    unalias = kiln_cli(env, "models", "unalias", "wine-cli", "production", "--json")
    assert unalias.exit_code == 0 and json.loads(unalias.stdout)["aliases"] == {}

    listed = kiln_cli(env, "jobs", "list", "--state", "succeeded")
    assert listed.exit_code == 0 and job_id in listed.stdout and "wine-cli v1" in listed.stdout
    shown_job = kiln_cli(env, "jobs", "show", job_id)
    assert shown_job.exit_code == 0 and "succeeded" in shown_job.stdout
    assert "progress 3/3" in shown_job.stdout
    metrics = kiln_cli(env, "jobs", "metrics", job_id, "--json")
    assert [e["epoch"] for e in json.loads(metrics.stdout)["epochs"]] == [1, 2, 3]
    table = kiln_cli(env, "jobs", "metrics", job_id)
    assert "train_loss" in table.stdout and "val_accuracy" in table.stdout
    logs = kiln_cli(env, "jobs", "logs", job_id, "--follow")
    assert logs.exit_code == 0 and "succeeded" in logs.stdout
    waited = kiln_cli(env, "jobs", "wait", job_id, "--json")
    assert waited.exit_code == 0 and json.loads(waited.stdout)["state"] == "succeeded"


def test_submit_without_follow_then_wait(env: dict[str, str | None], tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "iris-queued", epochs=2)
    doc = yaml.safe_load(spec.read_text())
    doc["data"]["source"] = "sklearn:iris"
    spec.write_text(yaml.safe_dump(doc))
    queued = kiln_cli(env, "jobs", "submit", str(spec), "--json")
    assert queued.exit_code == 0, queued.output
    job = json.loads(queued.stdout)
    assert job["state"] == "queued"
    waited = kiln_cli(env, "jobs", "wait", job["id"])
    assert waited.exit_code == 0, waited.output
    assert "model iris-queued version 1" in waited.stdout


def test_submit_kind_compress_registers_variants(
    env: dict[str, str | None], tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, "iris-to-compress", epochs=5)
    doc = yaml.safe_load(spec.read_text())
    doc["data"]["source"] = "sklearn:iris"
    spec.write_text(yaml.safe_dump(doc))
    trained = kiln_cli(env, "jobs", "submit", str(spec), "--follow")
    assert trained.exit_code == 0, trained.output

    compress = tmp_path / "compress.yaml"
    compress.write_text(
        yaml.safe_dump(
            {
                "source": "model:iris-to-compress@1",
                "steps": [{"quantize": {"method": "int8_dynamic", "backend": "onnxruntime"}}],
                "tolerance": {"metric": "accuracy", "max_drop": 1.0},
            }
        )
    )
    result = kiln_cli(env, "jobs", "submit", str(compress), "--kind", "compress", "--follow")
    assert result.exit_code == 0, result.output
    assert "iris-to-compress v1 -> v2 (" in result.stdout, result.stdout
    versions = kiln_cli(env, "models", "versions", "iris-to-compress", "--json")
    assert [v["version"] for v in json.loads(versions.stdout)["items"]] == [2, 1]

    # the server checks a compress spec at submit time: a training path is not a source
    compress.write_text(yaml.safe_dump({"source": "models/x", "steps": [{"prune": {}}]}))
    refused = kiln_cli(env, "jobs", "submit", str(compress), "--kind", "compress")
    assert refused.exit_code == 3 and "spec.source" in refused.stderr, refused.output
    assert "model:<name>" in refused.stderr
    group = kiln_cli(env, "jobs", "--help")
    assert "compression" in group.stdout


def test_a_failed_job_exits_with_its_errors_code(
    env: dict[str, str | None], wine_csv: Path, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, "wine-diverges")
    doc = yaml.safe_load(spec.read_text())
    doc["train"]["optimizer"] = {"name": "sgd", "lr": 1e30}  # passes every check, then NaN
    spec.write_text(yaml.safe_dump(doc))
    args = ["jobs", "submit", str(spec), "--data", str(wine_csv), "--max-attempts", "1"]
    result = kiln_cli(env, *args, "--follow")
    assert result.exit_code == 7, result.output  # TrainingError
    assert "failed" in result.stderr and "diverged" in result.stderr
    as_json = kiln_cli(env, *args, "--follow", "--json")
    assert as_json.exit_code == 7
    assert json.loads(as_json.stdout)["error"]["code"] == "training_failed"

    # a target the uploaded table lacks is refused at submit time, naming the field
    bad = write_spec(tmp_path, "wine-bad", target="no_such_column")
    refused = kiln_cli(env, "jobs", "submit", str(bad), "--data", str(wine_csv))
    assert refused.exit_code == 3, refused.output
    assert "data.target" in refused.stderr and "no_such_column" in refused.stderr


def test_a_bad_spec_exits_3_naming_the_field(env: dict[str, str | None], tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "typo")
    doc = yaml.safe_load(spec.read_text())
    doc["data"]["source"] = "sklearn:iris"
    doc["model"] = {"type": "mlp", "hiden": [4]}
    spec.write_text(yaml.safe_dump(doc))
    result = kiln_cli(env, "jobs", "submit", str(spec))
    assert result.exit_code == 3
    assert "spec.model.hiden" in result.stderr and "did you mean 'hidden'" in result.stderr
    bad_kind = kiln_cli(env, "jobs", "submit", str(spec), "--kind", "deploy")
    assert bad_kind.exit_code == 3 and "--kind" in bad_kind.stderr


def test_cancel_a_queued_job(env: dict[str, str | None], platform: Platform) -> None:
    from kiln.client import Client

    with Client(platform.url, platform.admin_key) as client:
        spec = {
            "name": "iris-slow",
            "task": "classification",
            "data": {"source": "sklearn:iris", "target": "target"},
            "model": {"type": "linear"},
            "train": {"epochs": 2000, "batch_size": 4, "device": "cpu"},
        }
        busy = client.jobs.submit(spec)
        waiting = client.jobs.submit({**spec, "name": "iris-waiting"})
        cancelled = kiln_cli(env, "jobs", "cancel", waiting["id"])
        stopping = kiln_cli(env, "jobs", "cancel", busy["id"])
        assert cancelled.exit_code == 0, cancelled.output
        assert stopping.exit_code == 0, stopping.output
        assert client.jobs.wait(busy["id"], timeout=60, poll=0.1)["state"] == "cancelled"
    waited = kiln_cli(env, "jobs", "wait", waiting["id"])
    assert waited.exit_code == 1 and "cancelled" in waited.stderr
    again = kiln_cli(env, "jobs", "cancel", waiting["id"])
    assert again.exit_code == 12 and "already cancelled" in again.stderr


def test_ctrl_c_stops_following_not_the_job(
    env: dict[str, str | None], platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.client import Client, Jobs

    def interrupted_after_one_poll(self: Jobs, job_id: str, **kwargs: Any) -> Any:
        kwargs["on_update"](self.get(job_id))
        raise KeyboardInterrupt

    monkeypatch.setattr(Jobs, "wait", interrupted_after_one_poll)
    spec = {
        "name": "iris-followed",
        "task": "classification",
        "data": {"source": "sklearn:iris", "target": "target"},
        "model": {"type": "linear"},
        "train": {"epochs": 2000, "batch_size": 4, "device": "cpu"},
    }
    with Client(platform.url, platform.admin_key) as client:
        job = client.jobs.submit(spec)
        result = kiln_cli(env, "jobs", "wait", job["id"])
        assert result.exit_code == 130
        assert f"job {job['id']} keeps running on the server" in result.stderr
        assert client.jobs.get(job["id"])["state"] in ("queued", "running")
        client.jobs.cancel(job["id"])
        monkeypatch.undo()
        assert client.jobs.wait(job["id"], timeout=60, poll=0.1)["state"] == "cancelled"


def test_keys_create_prints_a_key_that_works(env: dict[str, str | None]) -> None:
    created = kiln_cli(
        env, "keys", "create", "--scope", "read", "--scope", "train", "--project", "default"
    )
    assert created.exit_code == 0, created.output
    assert "shown once" in created.stderr
    key = re.search(r"^(kiln_[0-9a-f]{16}_\S{43})$", created.stdout, re.M).group(1)  # type: ignore[union-attr]

    as_new = {**env, "KILN_API_KEY": key}
    assert kiln_cli(as_new, "datasets", "list").exit_code == 0
    forbidden = kiln_cli(as_new, "keys", "list")
    assert forbidden.exit_code == 11 and "'admin' scope" in forbidden.stderr

    listed = kiln_cli(env, "keys", "list", "--json")
    key_id = key.split("_")[1]
    assert {k["id"]: k["scopes"] for k in json.loads(listed.stdout)}[key_id] == ["read", "train"]
    revoked = kiln_cli(env, "keys", "revoke", key_id)
    assert revoked.exit_code == 0 and key_id in revoked.stdout
    assert kiln_cli(as_new, "datasets", "list").exit_code == 10


def test_projects_create_and_list(env: dict[str, str | None]) -> None:
    assert kiln_cli(env, "projects", "create", "cli-team").exit_code == 0
    listed = kiln_cli(env, "projects", "list", "--json")
    assert {"default", "cli-team"} <= {p["name"] for p in json.loads(listed.stdout)}
    dup = kiln_cli(env, "projects", "create", "cli-team")
    assert dup.exit_code == 12 and "already exists" in dup.stderr
    empty = kiln_cli(env, "models", "list", "--project", "cli-team", "--json")
    assert empty.exit_code == 0 and json.loads(empty.stdout)["items"] == []
    nowhere = kiln_cli(env, "models", "list", "--project", "nope")
    assert nowhere.exit_code == 6


def test_a_bad_key_exits_10(env: dict[str, str | None]) -> None:
    result = kiln_cli(env, "models", "list", "--api-key", "kiln_nope")
    assert result.exit_code == 10
    assert "invalid or missing API key" in result.stderr and "Traceback" not in result.output


def test_no_key_anywhere_exits_10(env: dict[str, str | None]) -> None:
    result = kiln_cli({**env, "KILN_API_KEY": None}, "models", "list")
    assert result.exit_code == 10
    assert "no API key" in result.stderr and "admin.key" in result.stderr


def test_the_local_admin_key_file_is_the_fallback(
    env: dict[str, str | None], platform: Platform
) -> None:
    local = {**env, "KILN_API_KEY": None, "KILN_HOME": str(platform.home)}
    result = kiln_cli(local, "projects", "list", "--json")
    assert result.exit_code == 0, result.output
    assert "using the admin key in" in result.stderr
    assert "default" in {p["name"] for p in json.loads(result.stdout)}


def test_an_unreachable_server_exits_14(env: dict[str, str | None]) -> None:
    port = free_port()
    result = kiln_cli(env, "jobs", "list", "--url", f"http://127.0.0.1:{port}")
    assert result.exit_code == 14
    assert f"127.0.0.1:{port}" in result.stderr
