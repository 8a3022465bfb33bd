"""Image models through the server: a zipped image folder in, a CNN trained by a job,
deployed, and answering images sent as base64 JSON and as KServe v2 BYTES tensors.

The app runs in-process with its lifespan (deployments load and batch as under
``kiln up``) on SQLite and a local artifact store; a real worker runs the jobs. Images
are tiny PNGs made in the test. Answers are compared with the library's own
``Bundle.predict`` of the registered version on the same image files. A table's image
column may name only files of its own dataset: absolute paths, ``..`` and names of files
elsewhere on the host are refused naming the row and the column.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

import kiln
from api.conftest import Platform, check_error_shape
from images.test_image_models import make_folder
from kiln.settings import Settings
from kiln.store.tables import ModelVersion

API = "/api/v1"
PER_CLASS = 8


def zip_folder(root: Path, arcname: str) -> bytes:
    """``root`` zipped under one top folder ``arcname`` (as a file manager zips it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            zf.write(path, f"{arcname}/{path.relative_to(root).as_posix()}")
    return out.getvalue()


def cnn_spec(source: str, **data: Any) -> dict[str, Any]:
    return {
        "name": "colours",
        "task": "classification",
        # no target: an image folder's sub-folder names are the labels
        "data": {"source": source, "split": {"test": 0.25, "val": 0.0}, **data},
        "model": {"type": "cnn", "channels": [4], "hidden": [16]},
        "train": {
            "epochs": 6,
            "batch_size": 8,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
        },
    }


class Server:
    """The in-process app with its lifespan, a platform's keys and helpers."""

    def __init__(self, platform: Platform) -> None:
        self.p = platform
        self.http = TestClient(platform.client.app)
        self.train = platform.create_key("default", ["read", "train"])
        self.deploy = platform.create_key("default", ["read", "deploy"])
        self.predict_key = platform.create_key("default", ["predict"])
        self.folder_ref = ""  # the zipped image folder's dataset, once uploaded

    def post(self, path: str, key: str, body: Any = None, **kw: Any) -> Any:
        r = self.http.post(path, headers=Platform.auth(key), json=body, **kw)
        if 400 <= r.status_code < 500 and not path.startswith("/v2/"):
            check_error_shape(r)
        return r

    def train_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        job_id = self.p.queued(self.train, "train", spec)
        self.p.run_jobs()
        job: dict[str, Any] = self.p.get(f"/jobs/{job_id}", self.train).json()
        return job


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("image-server") / "pics", per_class=PER_CLASS)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    platform = Platform(Settings(home=tmp_path_factory.mktemp("image-server-home") / "home"))
    s = Server(platform)
    with s.http:  # runs the lifespan: the deployment manager
        yield s
    platform.close()


@pytest.fixture(scope="module")
def deployed(server: Server, images: Path, tmp_path_factory: pytest.TempPathFactory) -> kiln.Bundle:
    """The zipped folder uploaded, trained by a job, deployed; the version's bundle."""
    r = server.p.upload(server.train, zip_folder(images, "pics"), "pics.zip")
    assert r.status_code == 201, r.text
    dataset = r.json()
    assert dataset["format"] == "images"
    assert dataset["rows"] == 3 * PER_CLASS
    assert [c["name"] for c in dataset["columns"]] == ["image", "label"]
    server.folder_ref = dataset["ref"]
    job = server.train_job(cnn_spec(dataset["ref"], augment={"hflip": True}))
    assert job["state"] == "succeeded", job
    r = server.post(f"{API}/deployments", server.deploy, {"name": "colours", "model": "colours"})
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "ready"
    with server.p.svc.db.session() as s:
        key = s.scalars(select(ModelVersion.artifact_key).where(ModelVersion.job_id == job["id"]))
        prefix = key.one()
    local = tmp_path_factory.mktemp("colours-bundle") / "bundle"
    server.p.svc.store.get_dir(prefix, local)
    return kiln.load(local)


def sample_images(images: Path) -> list[Path]:
    return [images / c / f"{i:02d}.png" for c in ("red", "green", "blue") for i in (0, 5)]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def expected(bundle: kiln.Bundle, paths: list[Path]) -> Any:
    return bundle.predict(pd.DataFrame({"image": [str(p) for p in paths]}))


def test_a_zipped_image_folder_trains_deploys_and_answers_base64(
    server: Server, deployed: kiln.Bundle, images: Path
) -> None:
    paths = sample_images(images)
    r = server.post(
        f"{API}/deployments/colours/predict",
        server.predict_key,
        {"inputs": [{"image": b64(p)} for p in paths]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    want = expected(deployed, paths)
    assert body["predictions"] == want.predictions
    assert sorted(body["labels"]) == ["blue", "green", "red"]
    np.testing.assert_allclose(body["probabilities"], want.probabilities, atol=1e-4)
    # a data: URL is base64 too
    url = "data:image/png;base64," + b64(paths[0])
    r = server.post(
        f"{API}/deployments/colours/predict", server.predict_key, {"inputs": [{"image": url}]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == want.predictions[:1]


def test_evaluate_and_crossval_jobs_read_the_image_folder_dataset(
    server: Server, deployed: kiln.Bundle
) -> None:
    spec = {"model": "colours", "version": 1, "data": server.folder_ref}
    job_id = server.p.queued(server.train, "evaluate", spec)
    server.p.run_jobs()
    job = server.p.get(f"/jobs/{job_id}", server.train).json()
    assert job["state"] == "succeeded", job
    assert job["result"]["metrics"]["rows"] == 3 * PER_CLASS
    crossval = cnn_spec(server.folder_ref)
    crossval["train"]["epochs"] = 1
    job_id = server.p.queued(server.train, "crossval", crossval, folds=2)
    server.p.run_jobs()
    job = server.p.get(f"/jobs/{job_id}", server.train).json()
    assert job["state"] == "succeeded", job


def test_v2_bytes_tensors_json_and_binary(
    server: Server, deployed: kiln.Bundle, images: Path
) -> None:
    paths = sample_images(images)
    want = expected(deployed, paths)
    n = len(paths)
    tensor = {"name": "image", "datatype": "BYTES", "shape": [n]}
    r = server.post(
        "/v2/models/colours/infer",
        server.predict_key,
        {"inputs": [{**tensor, "data": [b64(p) for p in paths]}]},
    )
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["predictions"]["data"] == want.predictions
    np.testing.assert_allclose(
        np.reshape(outputs["probabilities"]["data"], (n, -1)), want.probabilities, atol=1e-4
    )
    # the binary extension: raw PNG bytes, each after its 4-byte little-endian length
    chunk = b"".join(struct.pack("<I", len(p.read_bytes())) + p.read_bytes() for p in paths)
    head = json.dumps(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": len(chunk)}}]}
    ).encode()
    r = server.http.post(
        "/v2/models/colours/infer",
        headers={
            **Platform.auth(server.predict_key),
            "Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream",
        },
        content=head + chunk,
    )
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["predictions"]["data"] == want.predictions
    meta = server.http.get("/v2/models/colours", headers=Platform.auth(server.predict_key))
    assert meta.json()["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]


@pytest.mark.parametrize(
    ("image", "says"),
    [
        ("not base64 at all!", "not valid base64"),
        (base64.b64encode(b"just some bytes, no image").decode(), "not a readable image"),
        ("/etc/passwd", "not valid base64"),  # a path is never opened
        (12, "expected a base64-encoded image"),
        ("", "empty image"),
    ],
)
def test_bad_images_are_422_naming_the_input(
    server: Server, deployed: kiln.Bundle, image: Any, says: str
) -> None:
    r = server.post(
        f"{API}/deployments/colours/predict",
        server.predict_key,
        {"inputs": [{"image": image}]},
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "inputs[0].image"
    assert says in error["message"]


def test_a_decompression_bomb_is_refused_before_decoding(
    server: Server, deployed: kiln.Bundle
) -> None:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (8000, 6000)).save(out, format="PNG")  # 48 MP of zeros: ~50 kB
    r = server.post(
        f"{API}/deployments/colours/predict",
        server.predict_key,
        {"inputs": [{"image": base64.b64encode(out.getvalue()).decode()}]},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "inputs[0].image"
    assert "pixels" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["@@@"]},
        {"name": "image", "datatype": "FP32", "shape": [1], "data": [1.5]},
        {"name": "image", "datatype": "STRING", "shape": [1], "data": ["x"]},
        {"name": "image", "datatype": None, "shape": [1], "data": ["x"]},
        {"name": "input", "datatype": "FP32", "shape": [1, 1], "data": ["x"]},
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [{"a": 1}]},
    ],
)
def test_v2_strings_and_unknown_datatypes_are_4xx(
    server: Server, deployed: kiln.Bundle, tensor: dict[str, Any]
) -> None:
    r = server.post("/v2/models/colours/infer", server.predict_key, {"inputs": [tensor]})
    assert 400 <= r.status_code < 500, r.text
    assert isinstance(r.json()["error"], str)


# ---- image paths in a table stay inside their dataset ----------------------------------


def table_zip(images: Path, paths: list[str]) -> bytes:
    """A zip of ``train.csv`` (image, label) beside the images it may name."""
    labels = ["red", "green", "blue"] * (len(paths) // 3 + 1)
    table = pd.DataFrame({"image": paths, "label": labels[: len(paths)]})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("train.csv", table.to_csv(index=False))
        for path in sorted(images.rglob("*.png")):
            zf.write(path, f"img/{path.relative_to(images).as_posix()}")
    return out.getvalue()


def good_paths() -> list[str]:
    return [f"img/{c}/{i:02d}.png" for i in range(PER_CLASS) for c in ("red", "green", "blue")]


def test_a_table_with_its_images_trains_through_the_server(server: Server, images: Path) -> None:
    r = server.p.upload(server.train, table_zip(images, good_paths()), "table.zip")
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "csv+images"
    spec = cnn_spec(r.json()["ref"], image="image", target="label")
    spec["name"] = "colours-table"
    job = server.train_job(spec)
    assert job["state"] == "succeeded", job


@pytest.mark.parametrize(
    "bad",
    ["/etc/passwd", "../../../../etc/hosts", "img/../../x.png", "~/x.png", "C:/x.png", "x\\y.png"],
)
def test_paths_leaving_the_dataset_are_refused_at_upload_naming_row_and_column(
    server: Server, images: Path, bad: str
) -> None:
    paths = good_paths()
    paths[4] = bad
    before = server.p.artifact_files()
    r = server.p.upload(server.train, table_zip(images, paths), "table.zip")
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "image"
    assert "row 4" in error["message"]
    assert server.p.artifact_files() == before  # nothing stored


@pytest.mark.parametrize(
    ("form", "says"),
    [
        ("absolute", "is not a path inside the dataset"),
        ("dotdot", "is not a path inside the dataset"),
        ("missing", "is not a file of the dataset"),
    ],
)
def test_a_job_reads_no_image_outside_its_dataset(
    server: Server, images: Path, tmp_path: Path, form: str, says: str
) -> None:
    # a plain table (no archive) naming a real image elsewhere on the host, absolutely
    # or with enough '..' to reach it from any folder: the worker refuses the row
    # before opening anything
    outside = tmp_path / "x.png"
    outside.write_bytes((images / "red" / "00.png").read_bytes())
    bad = {
        "absolute": str(outside),
        "dotdot": "../" * 40 + str(outside).lstrip("/"),
        "missing": "img/missing.png",
    }[form]
    paths = [bad, *good_paths()[1:]]
    table = pd.DataFrame({"image": paths, "label": (["red", "green", "blue"] * 8)[: len(paths)]})
    r = server.p.upload(server.train, table.to_csv(index=False).encode(), "paths.csv")
    assert r.status_code == 201, r.text
    spec = cnn_spec(r.json()["ref"], image="image", target="label")
    spec["name"] = "escape"
    job = server.train_job(spec)
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "invalid_data"
    assert job["error"]["field"] == "image"
    assert "row 0" in job["error"]["message"]
    assert says in job["error"]["message"]


def test_a_compress_job_re_reads_the_image_folder_dataset(
    server: Server, deployed: kiln.Bundle
) -> None:
    # compress needs validation rows: a model of its own with a validation split
    spec = cnn_spec(server.folder_ref)
    spec["name"] = "colours-val"
    spec["data"]["split"] = {"test": 0.25, "val": 0.25}
    assert server.train_job(spec)["state"] == "succeeded"
    compress = {
        "source": "model:colours-val@1",  # its data: the lineage's dataset, fetched again
        "steps": [{"quantize": {"method": "int8_dynamic", "backend": "onnxruntime"}}],
        # a dozen held-out images: too few to judge a drop, which is not what this tests
        "tolerance": {"metric": "accuracy", "max_drop": 1.0, "min_rows": 1},
    }
    job_id = server.p.queued(server.train, "compress", compress)
    server.p.run_jobs()
    job = server.p.get(f"/jobs/{job_id}", server.train).json()
    assert job["state"] == "succeeded", (job["error"], job["result"])
    assert [v["version"] for v in job["result"]["variants"]] == [2]
