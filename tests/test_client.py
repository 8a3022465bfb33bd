"""kiln.Client against a real server (uvicorn on 127.0.0.1) with a worker running jobs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml

import kiln
from cli.live_server import Platform, running_platform
from kiln.archive import extract_bundle
from kiln.client import Client
from kiln.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    KilnError,
    NotFoundError,
    ServiceError,
    SpecError,
)
from kiln.lifecycle import FINAL_STATES, JobKind, JobState
from support import free_port, wait_for


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home, roots = tmp_path_factory.mktemp("kiln-home"), tmp_path_factory.mktemp("data-roots")
    with running_platform(home, data_roots=[roots]) as running:
        yield running


@pytest.fixture
def admin(platform: Platform) -> Iterator[Client]:
    with Client(platform.url, platform.admin_key, project="default") as client:
        yield client


@pytest.fixture(scope="module")
def iris_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.datasets import load_iris

    frame = load_iris(as_frame=True).frame
    frame["target"] = frame["target"].map({0: "setosa", 1: "versicolor", 2: "virginica"})
    path = tmp_path_factory.mktemp("data") / "iris.csv"
    frame.to_csv(path, index=False)
    return path


def iris_spec(name: str = "iris", **train: Any) -> dict[str, Any]:
    return {
        "name": name,
        "task": "classification",
        "data": {"source": "sklearn:iris", "target": "target"},
        "model": {"type": "mlp", "hidden": [8]},
        "train": {"epochs": 3, "batch_size": 32, "device": "cpu", **train},
    }


def test_health_needs_no_key(platform: Platform) -> None:
    with Client(platform.url, api_key="") as anonymous:
        assert anonymous.health() == {"status": "ok", "version": kiln.__version__}
        with pytest.raises(AuthError, match="invalid or missing API key"):
            anonymous.datasets.list()


def test_projects_and_keys_round_trip(platform: Platform, admin: Client) -> None:
    assert admin.projects.create("team-a")["name"] == "team-a"
    assert {"default", "team-a"} <= {p["name"] for p in admin.projects.list()}
    with pytest.raises(ConflictError, match="already exists") as exc:
        admin.projects.create("team-a")
    assert exc.value.field == "name"

    issued = admin.keys.create(["read"], project="team-a", name="reader")
    assert issued["key"].startswith("kiln_") and issued["project"] == "team-a"
    listed = {k["id"]: k for k in admin.keys.list()}
    assert listed[issued["id"]]["scopes"] == ["read"] and "key" not in listed[issued["id"]]

    with Client(platform.url, issued["key"]) as reader:
        assert reader.datasets.list()["items"] == []
        assert reader.jobs.list()["total"] == 0
        with pytest.raises(ForbiddenError, match="'train' scope") as forbidden:
            reader.jobs.submit(iris_spec())
        assert forbidden.value.field == "scopes" and forbidden.value.exit_code == 11
        # a project key naming another project sees nothing there
        other = Client(platform.url, issued["key"], project="default")
        with other, pytest.raises(NotFoundError, match="project 'default' not found"):
            other.datasets.list()
        assert admin.keys.revoke(issued["id"])["revoked_at"] is not None
        with pytest.raises(AuthError) as revoked:
            reader.datasets.list()
        assert revoked.value.exit_code == 10


def test_project_option_scopes_a_global_admin_key(
    platform: Platform, admin: Client, iris_csv: Path
) -> None:
    admin.projects.create("team-b")
    with Client(platform.url, platform.admin_key, project="team-b") as team_b:
        row = team_b.datasets.upload(iris_csv, name="iris-b")
        assert [d["id"] for d in team_b.datasets.all()] == [row["id"]]
    assert row["id"] not in {d["id"] for d in admin.datasets.all()}
    with pytest.raises(NotFoundError):
        admin.datasets.get(row["id"])


def test_errors_map_to_kiln_error_classes(platform: Platform, admin: Client) -> None:
    bad = Client(platform.url, "kiln_0123456789abcdef_" + "x" * 43)
    with bad, pytest.raises(AuthError) as unauthorized:
        bad.models.list()
    assert unauthorized.value.code == "unauthorized"

    with pytest.raises(NotFoundError, match="job_nope"):
        admin.jobs.get("job_nope")
    with pytest.raises(NotFoundError, match="model 'nope' not found"):
        admin.models.version("nope")

    typo = iris_spec()
    typo["model"] = {"type": "mlp", "hiden": [3]}
    with pytest.raises(SpecError, match="did you mean 'hidden'") as spec_error:
        admin.jobs.submit(typo)
    assert spec_error.value.field == "spec.model.hiden"
    assert spec_error.value.exit_code == 3

    # a code the client has no class for stays a KilnError, with the server's code
    with pytest.raises(KilnError) as invalid:
        admin.jobs.list(state="sleeping")
    assert type(invalid.value) is KilnError
    assert invalid.value.code == "invalid_request" and invalid.value.field == "state"


def test_a_response_that_is_not_kiln_json_is_a_service_error() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(502, text="<html>proxy</html>"))
    client = Client("http://kiln.test", "k", transport=transport)
    with client, pytest.raises(ServiceError, match=r"server at http://kiln.test answered 502"):
        client.models.list()
    ok_but_html = httpx.MockTransport(lambda request: httpx.Response(200, text="<html>"))
    client = Client("http://kiln.test", "k", transport=ok_but_html)
    with client, pytest.raises(ServiceError, match="not JSON"):
        client.models.list()


def test_an_unreachable_server_is_a_service_error_naming_the_url() -> None:
    port = free_port()  # nothing listens there
    client = Client(f"http://127.0.0.1:{port}", "k")
    with (
        client,
        pytest.raises(ServiceError, match=f"cannot reach the kiln server at .*:{port}") as exc,
    ):
        client.health()
    assert exc.value.exit_code == 14


CLIENT_PROBE = """
import json, sys
import kiln.client
print(json.dumps({
    "final": sorted(kiln.client.FINAL_STATES),
    "sqlalchemy": "sqlalchemy" in sys.modules,
}))
"""


def test_the_client_shares_the_job_lifecycle_without_the_store() -> None:
    # the SDK's end states are the store's, and importing it pulls in no SQLAlchemy
    out = subprocess.run(
        [sys.executable, "-c", CLIENT_PROBE], capture_output=True, text=True, check=True
    )
    probe = json.loads(out.stdout)
    assert probe == {"final": ["cancelled", "failed", "succeeded"], "sqlalchemy": False}
    assert kiln.client.FINAL_STATES is FINAL_STATES
    assert set(JobState) - FINAL_STATES == {JobState.queued, JobState.running}


def test_settings_supply_url_key_and_project(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_URL", platform.url + "/")
    monkeypatch.setenv("KILN_API_KEY", platform.admin_key)
    monkeypatch.setenv("KILN_PROJECT", "default")
    with Client() as client:
        assert client.url == platform.url and client.project == "default"
        assert client.models.list()["limit"] == 50


def test_dataset_pages_are_followed(admin: Client, iris_csv: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.jsonl"
    pd.DataFrame({"x": [1.0, 2.0], "y": ["a", "b"]}).to_json(small, orient="records", lines=True)
    ids = [admin.datasets.upload(small, name=f"small-{i}")["id"] for i in range(3)]
    page = admin.datasets.list(limit=2)
    assert len(page["items"]) == 2 and page["next_offset"] == 2
    every = [d["id"] for d in admin.datasets.all(page_size=1)]
    assert set(ids) <= set(every) and len(every) == page["total"]
    got = admin.datasets.get(ids[0])
    assert got["rows"] == 2 and got["format"] == "jsonl" and got["ref"] == f"dataset:{ids[0]}"
    with pytest.raises(NotFoundError, match="file not found"):
        admin.datasets.upload(tmp_path / "missing.csv")


def test_import_a_table_the_server_can_read(platform: Platform, admin: Client) -> None:
    root = platform.services.settings.data_roots[0]
    pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": ["a", "b", "a"]}).to_csv(root / "t.csv", index=False)
    row = admin.datasets.import_uri(str(root / "t.csv"), name="imported")
    assert row["name"] == "imported" and row["rows"] == 3
    with pytest.raises(KilnError) as outside:
        admin.datasets.import_uri("/etc/passwd", name="nope")
    assert outside.value.http_status in (403, 404, 422)


def test_submit_with_data_trains_registers_and_downloads(
    admin: Client, iris_csv: Path, tmp_path: Path
) -> None:
    spec = iris_spec("iris-client")
    spec["data"] = {"target": "target"}  # the source comes from --data
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    job = admin.jobs.submit(path, data=iris_csv)
    assert job["state"] == "queued"
    assert job["spec"]["data"]["source"].startswith("dataset:ds_")

    seen: list[str] = []
    done = admin.jobs.wait(
        job["id"], timeout=120, poll=0.1, on_update=lambda j: seen.append(j["state"])
    )
    assert done["state"] == "succeeded", done["error"]
    assert seen[-1] == "succeeded"
    assert done["model_version"] == {"model": "iris-client", "version": 1}
    assert done["progress"] == {"epoch": 3, "epochs": 3}
    assert [e["epoch"] for e in admin.jobs.metrics(job["id"])["epochs"]] == [1, 2, 3]
    logs = admin.jobs.logs(job["id"])
    assert logs[-1]["message"] == "succeeded"
    assert admin.jobs.logs(job["id"], after=logs[-1]["id"]) == []
    assert job["id"] in {j["id"] for j in admin.jobs.all(state="succeeded")}

    assert admin.models.get("iris-client")["latest_version"] == 1
    assert [m["name"] for m in admin.models.all()].count("iris-client") == 1
    version = admin.models.version("iris-client")
    assert version["job_id"] == job["id"] and "accuracy" in version["metrics"]["test"]
    assert admin.models.versions("iris-client")["total"] == 1
    assert admin.models.set_alias("iris-client", "production", 1)["aliases"] == {"production": 1}
    assert admin.models.version("iris-client", "production")["version"] == 1

    bundle_dir = admin.models.download("iris-client", "production", dest=tmp_path / "models")
    assert bundle_dir == tmp_path / "models" / "iris-client-v1"
    bundle = kiln.load(str(bundle_dir))
    rows = pd.read_csv(iris_csv).drop(columns=["target"]).iloc[[0, 75, 149]]
    predictions = bundle.predict(rows).predictions
    assert len(predictions) == 3
    assert set(predictions) <= {"setosa", "versicolor", "virginica"}
    with pytest.raises(ConflictError, match="already exists"):
        admin.models.download("iris-client", 1, dest=tmp_path / "models")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["iris-client-v1"]

    assert admin.models.delete_alias("iris-client", "production")["aliases"] == {}
    with pytest.raises(NotFoundError):
        admin.models.download("iris-client", "production", dest=tmp_path / "other")


def test_crossval_and_evaluate_jobs(admin: Client, iris_csv: Path) -> None:
    cv = admin.jobs.submit(iris_spec("iris-cv", epochs=2), kind=JobKind.crossval, folds=2)
    cv = admin.jobs.wait(cv["id"], timeout=120, poll=0.1)
    assert cv["state"] == "succeeded", cv["error"]
    assert cv["result"]["k"] == 2 and "accuracy" in cv["result"]["mean"]

    trained = admin.jobs.wait(admin.jobs.submit(iris_spec("iris-eval"))["id"], timeout=120)
    assert trained["state"] == "succeeded", trained["error"]
    ev = admin.jobs.submit(
        {"model": "iris-eval", "version": "latest"}, kind="evaluate", data=iris_csv
    )
    ev = admin.jobs.wait(ev["id"], timeout=120, poll=0.1)
    assert ev["state"] == "succeeded", ev["error"]
    assert ev["result"]["metrics"]["rows"] == 150


def test_a_failed_job_is_returned_not_raised(admin: Client, iris_csv: Path) -> None:
    spec = iris_spec("iris-bad")
    # passes every submit-time check, then diverges on the worker
    spec["train"]["optimizer"] = {"name": "sgd", "lr": 1e30}
    job = admin.jobs.submit(spec, data=iris_csv, max_attempts=1)
    done = admin.jobs.wait(job["id"], timeout=120, poll=0.1)
    assert done["state"] == "failed"
    assert done["error"]["code"] == "training_failed"
    assert "diverged" in done["error"]["message"]


def test_cancel_and_wait_timeout(admin: Client) -> None:
    running = admin.jobs.submit(iris_spec("iris-long", epochs=2000, batch_size=4))
    with pytest.raises(TimeoutError, match="still"):
        admin.jobs.wait(running["id"], timeout=0.0)
    wait_for(
        lambda: admin.jobs.get(running["id"])["state"] != "queued",
        timeout=60,
        what="the job to start",
    )
    # the one worker is busy, so this one stays queued and is cancelled at once
    queued = admin.jobs.submit(iris_spec("iris-queued"))
    assert admin.jobs.cancel(queued["id"])["state"] == "cancelled"
    with pytest.raises(ConflictError, match="already cancelled"):
        admin.jobs.cancel(queued["id"])

    asked = admin.jobs.cancel(running["id"])
    assert asked["state"] == "running" and asked["cancel_requested"] is True
    done = admin.jobs.wait(running["id"], timeout=60, poll=0.1)
    assert done["state"] == "cancelled"
    with pytest.raises(NotFoundError):
        admin.models.get("iris-long")


# --- safe extraction of downloaded bundles -------------------------------------------


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.parametrize(
    "members",
    [
        [_file("m-v1/kiln.json"), _file("m-v1/../../escaped.txt")],
        [_file("../escaped.txt")],
        [_file("/tmp/escaped.txt")],
        [_file("m-v1/kiln.json"), _link("m-v1/evil", "../../escaped.txt", tarfile.SYMTYPE)],
        [_file("m-v1/kiln.json"), _link("m-v1/evil", "/etc/passwd", tarfile.LNKTYPE)],
        [_file("m-v1/kiln.json"), _file("other/kiln.json")],
        [],
    ],
    ids=["dotdot-inside", "dotdot-top", "absolute", "symlink", "hardlink", "two-tops", "empty"],
)
def test_extract_refuses_unsafe_archives(tmp_path: Path, members: list[Any]) -> None:
    archive = _tar(tmp_path / "evil.tar.gz", members)
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(ServiceError, match="bundle archive"):
        extract_bundle(archive, dest)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not dest.exists() or not any(dest.iterdir())


def test_extract_gives_the_top_folder(tmp_path: Path) -> None:
    archive = _tar(
        tmp_path / "ok.tar.gz",
        [_file("m-v2/kiln.json", b"{}"), _file("m-v2/tokenizer/vocab.txt", b"a")],
    )
    top = extract_bundle(archive, tmp_path / "dest")
    assert top == tmp_path / "dest" / "m-v2"
    assert (top / "kiln.json").read_bytes() == b"{}"
    assert (top / "tokenizer" / "vocab.txt").read_bytes() == b"a"


def test_extract_refuses_a_file_that_is_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(ServiceError, match="could not be extracted"):
        extract_bundle(junk, tmp_path / "dest")
