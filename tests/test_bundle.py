"""The bundle directory: save/load round trip, integrity checks, atomic saves, predict."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import kiln
from kiln.bundle import Bundle
from kiln.data.sources import read_table
from kiln.errors import BundleError, DataError, NotFoundError

BUNDLE_FILES = {"kiln.json", "weights.safetensors", "preprocess.json"}


@pytest.fixture(scope="module")
def iris() -> pd.DataFrame:
    return read_table("sklearn:iris")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Bundle, Path]:
    """An MLP trained briefly on iris, saved once for the module (copy it to modify it)."""
    spec = {
        "name": "iris-mlp",
        "task": "classification",
        "data": {"source": "sklearn:iris", "target": "target"},
        "model": {"type": "mlp", "hidden": [8], "batch_norm": True, "dropout": 0.1},
        "train": {"epochs": 15, "device": "cpu", "optimizer": {"name": "adam", "lr": 0.05}},
    }
    out = tmp_path_factory.mktemp("bundles") / "iris"
    return kiln.fit(spec, out=out), out


@pytest.fixture
def copy_of(saved, tmp_path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(saved[1], dest)
    return dest


def features(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns="target")


# ---- round trip ------------------------------------------------------------------------


def test_bundle_directory_holds_exactly_the_contract_files(saved):
    bundle, path = saved
    assert {p.name for p in path.iterdir()} == BUNDLE_FILES
    meta = json.loads((path / "kiln.json").read_text())
    assert meta["format"] == "kiln.bundle"
    assert meta["format_version"] == 2
    assert set(meta["files"]) == {"weights.safetensors", "preprocess.json"}
    assert meta["labels"] == ["setosa", "versicolor", "virginica"]
    assert meta["lineage"]["spec"]["name"] == "iris-mlp"
    assert meta["lineage"]["data"]["fingerprint"].startswith("sha256:")
    assert meta["parameters"] == sum(p.numel() for p in bundle.model.parameters())
    assert [c["name"] for c in meta["input_schema"]] == bundle.preprocessor.feature_names


def test_save_load_round_trip_predicts_identically(saved, iris):
    bundle, path = saved
    loaded = kiln.load(str(path))
    rows = features(iris)
    a, b = bundle.predict(rows), loaded.predict(rows)
    assert a.predictions == b.predictions
    assert a.probabilities == b.probabilities  # bit-identical, not merely close
    assert loaded.meta.model_dump() == bundle.meta.model_dump()
    assert loaded.preprocessor.to_json() == bundle.preprocessor.to_json()
    for key, value in bundle.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    assert not loaded.model.training


LOAD_SCRIPT = """
import json, pickle, sys

def refuse(*args, **kwargs):
    raise AssertionError("bundle loading must not unpickle")

pickle.load = pickle.loads = refuse
import torch

torch.load = refuse
import kiln

bundle = kiln.load(sys.argv[1])
rows = json.loads(sys.argv[2])
print(json.dumps(bundle.predict(rows).to_dict()))
"""


@pytest.mark.e2e
def test_load_in_a_fresh_process_without_unpickling(saved, iris):
    bundle, path = saved
    rows = features(iris).iloc[::10].to_dict(orient="records")
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(path), json.dumps(rows)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    want = bundle.predict(rows)
    assert got["predictions"] == want.predictions
    np.testing.assert_allclose(got["probabilities"], want.probabilities, rtol=1e-6, atol=1e-7)
    assert got["labels"] == ["setosa", "versicolor", "virginica"]


# ---- integrity ---------------------------------------------------------------------------


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["weights.safetensors", "preprocess.json"])
def test_tampered_file_fails_its_checksum(copy_of, name):
    flip_a_byte(copy_of / name)
    with pytest.raises(BundleError) as info:
        kiln.load(str(copy_of))
    assert "checksum" in info.value.message
    assert name in info.value.message


@pytest.mark.parametrize("name", sorted(BUNDLE_FILES))
def test_missing_file_is_a_bundle_error(copy_of, name):
    (copy_of / name).unlink()
    with pytest.raises(BundleError) as info:
        kiln.load(str(copy_of))
    assert name in info.value.message


def edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "kiln.json").read_text())
    meta.update(changes)
    (path / "kiln.json").write_text(json.dumps(meta))


def test_wrong_format_version_is_refused(copy_of):
    edit_meta(copy_of, format_version=3)
    with pytest.raises(BundleError, match="format version 3 is not supported"):
        kiln.load(str(copy_of))


def test_not_a_kiln_manifest_is_refused(copy_of):
    edit_meta(copy_of, format="something.else")
    with pytest.raises(BundleError, match="not a kiln bundle manifest"):
        kiln.load(str(copy_of))
    (copy_of / "kiln.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        kiln.load(str(copy_of))


def test_manifest_that_does_not_fit_the_weights_is_refused(copy_of):
    meta = json.loads((copy_of / "kiln.json").read_text())
    meta["model"]["hidden"] = [9]
    (copy_of / "kiln.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="does not fit the model"):
        kiln.load(str(copy_of))


def test_invalid_manifest_is_refused(copy_of):
    edit_meta(copy_of, task="clustering")
    with pytest.raises(BundleError, match="is invalid"):
        kiln.load(str(copy_of))


def test_missing_directory_is_not_found(tmp_path):
    with pytest.raises(NotFoundError):
        kiln.load(str(tmp_path / "nowhere"))


# ---- saving ------------------------------------------------------------------------------


def test_save_refuses_a_non_bundle_directory(saved, tmp_path):
    bundle, _ = saved
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="refusing to overwrite"):
        bundle.save(precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(BundleError):
        bundle.save(a_file)
    assert a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "precious"]


def test_save_into_an_empty_directory_and_over_an_old_bundle(saved, copy_of, tmp_path):
    bundle, _ = saved
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bundle.save(empty) == empty
    assert bundle.path == empty
    assert {p.name for p in empty.iterdir()} == BUNDLE_FILES
    # Replacing an existing bundle leaves no leftovers and a loadable result.
    (copy_of / "weights.safetensors").write_bytes(b"stale")
    bundle.save(copy_of)
    assert {p.name for p in copy_of.iterdir()} == BUNDLE_FILES
    kiln.load(str(copy_of))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "empty"]


def test_failed_save_leaves_nothing_behind(saved, copy_of, tmp_path, monkeypatch):
    import kiln.bundle as bundle_module

    bundle, _ = saved
    real_write = bundle_module.write_json

    def disk_full_on_manifest(path, data):
        if path.name == "kiln.json":  # weights and preprocess.json are already written
            raise OSError("No space left on device")
        real_write(path, data)

    monkeypatch.setattr(bundle_module, "write_json", disk_full_on_manifest)
    with pytest.raises(OSError, match="No space"):
        bundle.save(tmp_path / "new")
    before = {p.name: p.read_bytes() for p in copy_of.iterdir()}
    with pytest.raises(OSError, match="No space"):
        bundle.save(copy_of)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temp dirs, no "new"
    assert {p.name: p.read_bytes() for p in copy_of.iterdir()} == before  # old one intact
    kiln.load(str(copy_of))


# ---- predict -------------------------------------------------------------------------------


def test_predict_accepts_frames_records_and_arrays(saved, iris):
    bundle, _ = saved
    rows = features(iris).iloc[:5]
    want = bundle.predict(rows)
    assert want.predictions == bundle.predict(rows.to_dict(orient="records")).predictions
    assert want.predictions == bundle.predict(rows.to_numpy()).predictions
    assert want.predictions == bundle.predict(rows.to_numpy().tolist()).predictions
    assert bundle.predict(rows.iloc[0].to_dict()).predictions == want.predictions[:1]
    with_target = iris.iloc[:5]  # extra columns (the target) are ignored
    assert bundle.predict(with_target).predictions == want.predictions
    assert set(want.predictions) <= {"setosa", "versicolor", "virginica"}
    assert all(abs(sum(p) - 1) < 1e-5 for p in want.probabilities)
    out = want.to_dict()
    assert set(out) == {"predictions", "probabilities", "labels"}


def test_plain_numbers_skip_the_table_and_predict_exactly_as_it_does(saved, iris):
    bundle, _ = saved
    rows = features(iris).iloc[:7]
    as_objects = rows.astype(object)  # an object table goes column by column
    want = bundle.predict(as_objects)
    for given in (rows.to_dict(orient="records"), rows.to_numpy(), rows.to_numpy().tolist()):
        got = bundle.predict(given)
        assert got.predictions == want.predictions
        assert got.probabilities == want.probabilities  # bit for bit
    assert bundle.predict(torch.tensor(rows.to_numpy())).predictions == want.predictions


def test_predict_fills_missing_values_in_rows_as_in_a_table(saved, iris):
    bundle, _ = saved
    rows = features(iris).iloc[:3].to_dict(orient="records")
    rows[0]["petal length (cm)"] = float("nan")
    del rows[1]["sepal width (cm)"]
    frame = pd.DataFrame.from_records(rows)
    assert frame.isna().sum().sum() == 2  # both are filled with the training means
    assert bundle.predict(rows).probabilities == bundle.predict(frame).probabilities


def test_trained_bundle_is_accurate(saved, iris):
    bundle, _ = saved
    predictions = bundle.predict(features(iris)).predictions
    assert np.mean(np.array(predictions) == iris["target"].to_numpy()) > 0.85


def test_predict_with_a_missing_column_names_it(saved, iris):
    bundle, _ = saved
    rows = features(iris).iloc[:3].drop(columns="petal width (cm)")
    with pytest.raises(DataError) as info:
        bundle.predict(rows)
    assert info.value.field == "petal width (cm)"
    assert "petal width (cm)" in info.value.message


def test_predict_with_a_non_numeric_value_names_column_and_row(saved, iris):
    bundle, _ = saved
    rows = features(iris).iloc[:3].to_dict(orient="records")
    rows[2]["sepal length (cm)"] = "tall"
    with pytest.raises(DataError) as info:
        bundle.predict(rows)
    assert info.value.field == "sepal length (cm)"
    assert "row 2" in info.value.message
    assert "'tall' is not a number" in info.value.message


def test_predict_with_the_wrong_array_width(saved):
    bundle, _ = saved
    with pytest.raises(DataError) as info:
        bundle.predict(np.zeros((2, 3)))
    assert info.value.field == "inputs"
    assert "expected rows of 4 features" in info.value.message
    assert "[2, 3]" in info.value.message
    with pytest.raises(DataError, match="rows must be"):
        bundle.predict("not rows")


def test_predict_rejects_infinite_values(saved):
    bundle, _ = saved
    with pytest.raises(DataError, match="infinite"):
        bundle.predict(np.array([[1.0, 2.0, np.inf, 1.0]]))


# ---- evaluate ------------------------------------------------------------------------------


def test_evaluate_on_a_labelled_frame(saved, iris):
    bundle, _ = saved
    frame = iris.astype({"target": object})
    frame.loc[0, "target"] = None
    got = bundle.evaluate(frame)
    assert got["rows"] == 149
    assert got["rows_skipped"] == 1
    predictions = bundle.predict(features(iris).iloc[1:]).predictions
    expected = np.mean(np.array(predictions) == iris["target"].to_numpy()[1:])
    assert got["accuracy"] == pytest.approx(expected)
    assert np.sum(got["confusion_matrix"]) == 149


def test_evaluate_reads_a_table_path(saved, iris, tmp_path):
    bundle, _ = saved
    path = tmp_path / "iris.csv"
    iris.to_csv(path, index=False)
    assert bundle.evaluate(str(path))["accuracy"] == bundle.evaluate(iris)["accuracy"]


def test_evaluate_needs_the_target(saved, iris):
    bundle, _ = saved
    with pytest.raises(DataError) as info:
        bundle.evaluate(features(iris))
    assert info.value.field == "target"
    with pytest.raises(DataError, match="not seen in training"):
        bundle.evaluate(iris.assign(target="daisy"))


# ---- regression -----------------------------------------------------------------------------


def test_regression_bundle_predicts_in_target_units(tmp_path):
    spec = {
        "name": "diabetes",
        "task": "regression",
        "data": {"source": "sklearn:diabetes", "target": "target"},
        "model": {"type": "linear"},
        "train": {"epochs": 20, "device": "cpu", "optimizer": {"lr": 0.05}},
    }
    bundle = kiln.fit(spec, out=tmp_path / "diabetes")
    frame = read_table("sklearn:diabetes")
    loaded = kiln.load(str(tmp_path / "diabetes"))
    predictions = np.array(loaded.predict(features(frame)).predictions)
    assert loaded.predict(features(frame).iloc[:5]).probabilities is None
    # The target runs from 25 to 346 (mean 152): predictions must be in those units,
    # not in the standardised units the model was trained on.
    assert 120 < predictions.mean() < 185
    assert predictions.std() > 30
    assert predictions.min() > 0
    assert predictions.max() < 400
    metrics = loaded.evaluate(frame)
    assert metrics["r2"] > 0.3
    assert 40 < metrics["rmse"] < 70
    assert bundle.metrics["test"]["rmse"] == pytest.approx(loaded.metrics["test"]["rmse"])
    assert np.allclose(predictions, bundle.predict(features(frame)).predictions)


def test_cnn_bundle_round_trip(tmp_path):
    spec = {
        "name": "digits-cnn",
        "task": "classification",
        "data": {"source": "sklearn:digits", "target": "target"},
        "model": {"type": "cnn", "input_shape": [1, 8, 8], "channels": [4], "hidden": [16]},
        "train": {"epochs": 2, "device": "cpu", "batch_size": 64, "optimizer": {"lr": 0.02}},
    }
    bundle = kiln.fit(spec, out=tmp_path / "digits")
    loaded = kiln.load(str(tmp_path / "digits"))
    assert loaded.meta.model.input_shape == [1, 8, 8]
    assert loaded.meta.labels == list(range(10))
    frame = read_table("sklearn:digits").iloc[::20]
    a, b = bundle.predict(features(frame)), loaded.predict(features(frame))
    assert a.probabilities == b.probabilities
    assert np.mean(np.array(b.predictions) == frame["target"].to_numpy()) > 0.5
