"""Jobs: spec checks at submission, the lifecycle, metrics, logs, cancel, crossval, evaluate."""

from __future__ import annotations

from datetime import datetime

import pytest

from kiln.store.tables import Job

# (what to change in a valid spec, the field the 422 must name); None deletes the key
SPEC_ERRORS = [
    ({"model": {"type": "mlp", "hiden": [8]}}, "spec.model.hiden"),
    ({"train": {"epochs": -1, "device": "cpu"}}, "spec.train.epochs"),
    ({"train": {"epochs": 0, "device": "cpu"}}, "spec.train.epochs"),
    ({"data": {"source": "dataset:ds_0000000000000000", "target": "target"}}, "spec.data.source"),
    ({"data": {"source": "/etc/passwd.csv", "target": "target"}}, "spec.data.source"),
    ({"data": {"source": "file:///etc/passwd.csv", "target": "target"}}, "spec.data.source"),
    ({"data": {"source": "s3://bucket/x.csv", "target": "target"}}, "spec.data.source"),
    ({"data": {"source": "../../x.csv", "target": "target"}}, "spec.data.source"),
    ({"name": "../evil"}, "spec.name"),
    ({"name": "a/b"}, "spec.name"),
    ({"name": ""}, "spec.name"),
    ({"task": "telepathy"}, "spec.task"),
    ({"colour": "red"}, "spec.colour"),
    ({"name": None}, "spec.name"),
]


@pytest.mark.parametrize(("change", "field"), SPEC_ERRORS)
def test_bad_train_specs_are_422_naming_the_field_and_queue_nothing(
    platform, change, field
) -> None:
    spec = platform.spec("sklearn:iris")
    for key, value in change.items():
        if value is None:
            del spec[key]
        else:
            spec[key] = value
    for kind in ("train", "crossval"):
        r = platform.submit(platform.admin, kind, spec)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_spec"
        assert error["field"] == field
        assert field in error["message"]
    assert platform.count(Job) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "deploy", "spec": {}}, "kind"),
        ({"spec": {}}, "kind"),
        ({"kind": "train"}, "spec"),
        ({"kind": "train", "spec": [1, 2]}, "spec"),
        ({"kind": "crossval", "spec": "SPEC", "folds": 1}, "folds"),
        ({"kind": "train", "spec": "SPEC", "max_attempts": 0}, "max_attempts"),
        ({"kind": "train", "spec": "SPEC", "priority": 9}, "priority"),
    ],
)
def test_bad_job_bodies_are_422(platform, body, field) -> None:
    if body.get("spec") == "SPEC":
        body["spec"] = platform.spec("sklearn:iris")
    r = platform.post("/jobs", platform.admin, body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert r.json()["error"]["field"] == field
    assert platform.count(Job) == 0


def test_bad_evaluate_specs(world) -> None:
    key, ref = world.keys["alpha_train"], world.refs["alpha"]
    cases = [
        ({"model": "nope", "data": ref}, "spec.model"),
        ({"model": "iris", "version": 99, "data": ref}, "spec.version"),
        ({"model": "iris", "version": "no-such-alias", "data": ref}, "spec.version"),
        ({"model": "iris", "data": "dataset:ds_0000000000000000"}, "spec.data"),
        ({"model": "iris", "data": "/etc/passwd.csv"}, "spec.data"),
        ({"model": "iris"}, "spec.data"),
        ({"model": "iris", "data": ref, "extra": 1}, "spec.extra"),
    ]
    before = len(world.get("/jobs", key, limit=500).json()["items"])
    for spec, field in cases:
        r = world.submit(key, "evaluate", spec)
        assert r.status_code == 422, (spec, r.text)
        assert r.json()["error"]["field"] == field, spec
    assert len(world.get("/jobs", key, limit=500).json()["items"]) == before


def test_submitted_job_is_queued(platform) -> None:
    r = platform.submit(platform.admin, "train", platform.spec("sklearn:iris"), max_attempts=2)
    assert r.status_code == 201
    job = r.json()
    assert job["state"] == "queued"
    assert job["attempts"] == 0
    assert job["max_attempts"] == 2
    assert job["model_version"] is None
    assert job["spec"] == platform.spec("sklearn:iris")
    assert platform.get(f"/jobs/{job['id']}", platform.admin).json() == job


def test_train_jobs_register_versions(world) -> None:
    key = world.keys["alpha_read"]
    for name, version, epochs in (("train1", 1, 2), ("train2", 2, 3)):
        job = world.get(f"/jobs/{world.jobs[name]}", key).json()
        assert job["state"] == "succeeded", job
        assert job["attempts"] == 1
        assert job["error"] is None
        assert job["model_version"] == {"model": "iris", "version": version}
        assert job["result"]["version"] == version
        assert job["progress"] == {"epoch": epochs, "epochs": epochs}
        started, finished = (datetime.fromisoformat(job[k]) for k in ("started_at", "finished_at"))
        assert started <= finished
        assert "val_loss" in job["metrics"]

        series = world.get(f"/jobs/{world.jobs[name]}/metrics", key).json()
        assert series["job_id"] == world.jobs[name]
        assert [e["epoch"] for e in series["epochs"]] == list(range(1, epochs + 1))
        assert all("train_loss" in e and "val_loss" in e for e in series["epochs"])

        v = world.get(f"/models/iris/versions/{version}", key).json()
        assert v["job_id"] == world.jobs[name]
        assert v["dataset_id"] == world.refs["alpha"].removeprefix("dataset:")


def test_job_logs(world) -> None:
    key, job_id = world.keys["alpha_read"], world.jobs["train1"]
    logs = world.get(f"/jobs/{job_id}/logs", key).json()
    assert isinstance(logs, list) and logs
    assert set(logs[0]) == {"id", "attempt", "level", "message", "time"}
    messages = [line["message"] for line in logs]
    assert messages[0].startswith("attempt 1 started")
    assert messages[-1] == "succeeded"
    ids = [line["id"] for line in logs]
    assert ids == sorted(ids)
    # follow from a known line
    assert world.get(f"/jobs/{job_id}/logs", key, after=ids[0]).json() == logs[1:]
    assert world.get(f"/jobs/{job_id}/logs", key, after=ids[-1]).json() == []
    r = world.get(f"/jobs/{job_id}/logs", key, after=-1)
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "after"


def test_crossval_job_reports_every_fold(world) -> None:
    job = world.get(f"/jobs/{world.jobs['crossval']}", world.keys["alpha_read"]).json()
    assert job["state"] == "succeeded", job
    assert job["options"] == {"folds": 2}
    assert job["model_version"] is None  # crossval registers nothing
    result = job["result"]
    assert result["k"] == 2
    assert len(result["folds"]) == 2
    assert all("accuracy" in fold for fold in result["folds"])
    assert 0.0 <= result["mean"]["accuracy"] <= 1.0
    assert "accuracy" in result["std"]


def test_evaluate_job_scores_a_registered_version(world) -> None:
    job = world.get(f"/jobs/{world.jobs['evaluate']}", world.keys["alpha_read"]).json()
    assert job["state"] == "succeeded", job
    assert job["result"]["model"] == "iris"
    assert job["result"]["version"] == 1
    metrics = job["result"]["metrics"]
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert "f1_macro" in metrics


def test_job_list_filters_by_state(world) -> None:
    key = world.keys["alpha_read"]
    done = world.get("/jobs", key, state="succeeded", limit=500).json()
    assert {world.jobs[j] for j in ("train1", "train2", "crossval", "evaluate")} <= {
        j["id"] for j in done["items"]
    }
    assert all(j["state"] == "succeeded" for j in done["items"])
    assert done["total"] == len(done["items"])
    r = world.get("/jobs", key, state="exploded")
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "state"


def test_cancel_a_queued_job(platform) -> None:
    job_id = platform.queued(platform.admin, "train", platform.spec("sklearn:iris"))
    r = platform.post(f"/jobs/{job_id}/cancel", platform.admin)
    assert r.status_code == 200
    assert r.json()["state"] == "cancelled"
    assert r.json()["finished_at"] is not None
    platform.run_jobs()  # a worker does not pick it up
    job = platform.get(f"/jobs/{job_id}", platform.admin).json()
    assert job["state"] == "cancelled"
    assert job["attempts"] == 0
    assert platform.get("/models", platform.admin).json()["total"] == 0
    r = platform.post(f"/jobs/{job_id}/cancel", platform.admin)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "conflict"


def test_cancel_a_finished_job_is_409(world) -> None:
    job_id = world.jobs["train1"]
    r = world.post(f"/jobs/{job_id}/cancel", world.keys["alpha_train"])
    assert r.status_code == 409
    assert "succeeded" in r.json()["error"]["message"]
    assert world.get(f"/jobs/{job_id}", world.keys["alpha_read"]).json()["state"] == "succeeded"


def test_unknown_job_is_404(world) -> None:
    key = world.keys["alpha_train"]
    for path in ("/jobs/job_0000000000000000", "/jobs/job_0000000000000000/metrics"):
        r = world.get(path, key)
        assert r.status_code == 404
        assert r.json()["error"]["field"] == "job_id"
    assert world.post("/jobs/job_0000000000000000/cancel", key).status_code == 404
