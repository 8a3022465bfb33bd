"""Jobs: spec checks at submission, the lifecycle, metrics, logs, cancel, crossval, evaluate."""

from __future__ import annotations

import json
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


IRIS_COLUMNS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]

TEXT = {"type": "transformer"}
IMAGE = {"type": "cnn", "channels": [4], "hidden": [8]}
# (what to change in the data section of a spec on the uploaded iris table, the field the
# 422 must name, the column the message must suggest, or None for no suggestion)
COLUMN_ERRORS = [
    ({"target": "targt"}, "spec.data.target", "target"),
    ({"target": "species"}, "spec.data.target", None),
    ({"features": [IRIS_COLUMNS[0], "petal lenght (cm)"]}, "spec.data.features.1", IRIS_COLUMNS[2]),
    ({"text": "review"}, "spec.data.text", None),
    ({"text": [IRIS_COLUMNS[0], "sepal widht"]}, "spec.data.text.1", IRIS_COLUMNS[1]),
    ({"image": "img"}, "spec.data.image", None),
]
MODEL_OF = {"text": TEXT, "image": IMAGE}  # a model that reads the column named


@pytest.mark.parametrize(("change", "field", "hint"), COLUMN_ERRORS)
def test_columns_missing_from_the_dataset_are_422_at_submission(
    platform, change, field, hint
) -> None:
    """Checked against the dataset's stored columns, so the mistake is a 422 naming the
    key, not a job that fails on the worker."""
    ref = platform.dataset(platform.admin, "iris")
    spec = platform.spec(ref)
    spec["data"].update(change)
    spec["model"] = next((MODEL_OF[k] for k in change if k in MODEL_OF), spec["model"])
    for kind in ("train", "crossval"):
        r = platform.submit(platform.admin, kind, spec)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_spec"
        assert error["field"] == field
        first, *_, last = error["message"].splitlines()
        assert first.startswith(f"{field}: dataset {ref.removeprefix('dataset:')} has no column")
        assert (f"(did you mean {hint!r}?)" in first) == (hint is not None)
        assert last == "its columns: " + ", ".join([*IRIS_COLUMNS, "target"])
    assert platform.count(Job) == 0


def test_every_missing_column_is_named_at_once(platform) -> None:
    spec = platform.spec(platform.dataset(platform.admin, "iris"))
    spec["data"].update(target="Target", features=["sepal", IRIS_COLUMNS[1]])
    error = platform.submit(platform.admin, "train", spec).json()["error"]
    assert error["field"] == "spec.data.target"
    lines = error["message"].splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "spec.data.target",
        "spec.data.features.0",
        "its columns",
    ]
    assert "(did you mean 'target'?)" in lines[0]


def test_columns_the_dataset_has_are_accepted(platform) -> None:
    spec = platform.spec(platform.dataset(platform.admin, "iris"))
    spec["data"]["features"] = IRIS_COLUMNS[:2]
    assert platform.submit(platform.admin, "train", spec).status_code == 201


def test_an_image_folder_takes_its_label_under_any_name(platform, tmp_path) -> None:
    """An image folder's columns come from its layout (label: the sub-folder), so its
    target is not looked up among the stored columns."""
    import io
    import zipfile

    from PIL import Image

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for label, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            for i in range(2):
                png = io.BytesIO()
                Image.new("RGB", (4, 4), colour).save(png, format="PNG")
                zf.writestr(f"pics/{label}/{i}.png", png.getvalue())
    r = platform.upload(platform.admin, out.getvalue(), "pics.zip")
    assert r.status_code == 201, r.text
    ref = r.json()["ref"]
    for data in ({}, {"target": "colour"}):
        spec = {
            "name": "pics",
            "task": "classification",
            "data": {"source": ref, **data},
            "model": {"type": "cnn", "channels": [4], "hidden": [8]},
            "train": {"epochs": 1, "device": "cpu"},
        }
        r = platform.submit(platform.admin, "train", spec)
        assert r.status_code == 201, r.text


def test_evaluating_on_a_dataset_without_the_versions_columns_is_422(world) -> None:
    """An evaluation reads the version's target and inputs: checked at submission."""
    from sklearn.datasets import load_iris

    key = world.keys["alpha_train"]
    frame = load_iris(as_frame=True).frame
    frame = frame.rename(columns={"target": "targets", "petal width (cm)": "Petal width (cm)"})
    r = world.upload(key, frame.to_csv(index=False).encode(), "renamed.csv")
    assert r.status_code == 201, r.text
    ref = r.json()["ref"]
    before = len(world.get("/jobs", key, limit=500).json()["items"])
    r = world.submit(key, "evaluate", {"model": "iris", "version": 1, "data": ref})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "spec.data"
    lines = error["message"].splitlines()
    dataset = ref.removeprefix("dataset:")
    assert lines[:2] == [
        f"spec.data: dataset {dataset} has no column 'target' (iris v1's target)"
        " (did you mean 'targets'?)",
        f"spec.data: dataset {dataset} has no column 'petal width (cm)' (an input of iris v1)"
        " (did you mean 'Petal width (cm)'?)",
    ]
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


@pytest.mark.parametrize(
    "validation", ["/etc/passwd.jsonl", "../../x.jsonl", "dataset:ds_0000000000000000"]
)
def test_a_generation_specs_validation_source_is_checked_at_submission(
    platform, validation
) -> None:
    """``data.validation`` is a dataset of the project, checked like ``data.source``: by
    its form before any spec check, and its existence, at submission (a 422, no job)."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chat = (json.dumps({"messages": turns}) + "\n").encode()
    r = platform.upload(platform.admin, chat * 8, "chats.jsonl")
    assert r.status_code == 201, r.text
    spec = {
        "name": "tiny-gpt",
        "task": "generation",
        "data": {"source": r.json()["ref"], "validation": validation, "split": {"val": 0.0}},
        "model": {"type": "gpt", "layers": 1, "heads": 2, "dim": 16, "vocab_size": 300},
    }
    r = platform.submit(platform.admin, "train", spec)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "spec.data.validation", r.text
    assert platform.count(Job) == 0
