"""Compression of a gbdt bundle: ``kiln export`` writes the trees as ONNX (checked on
rows with missing values and category codes), quantize and prune are refused with the
reason, and distillation trains a network student with its own fitted preprocessing.

The source is a tiny LightGBM model trained here on a table made here: two numbers (one
with gaps) and a colour (with gaps) decide the class.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import kiln
from kiln.bundle import Bundle
from kiln.cli.main import app
from kiln.errors import SpecError

runner = CliRunner()


def table(n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=n), rng.normal(size=n)
    color = rng.choice(["red", "green", "blue"], size=n)
    frame = pd.DataFrame({"a": a, "b": b, "color": color.astype(object)})
    frame["target"] = ((a + 0.5 * b + 1.5 * (color == "red")) > 0.5).astype(int)
    frame.loc[::6, "a"] = np.nan
    frame.loc[2::9, "color"] = None
    return frame


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gbdt-compress")
    csv = root / "gaps.csv"
    table().to_csv(csv, index=False)
    spec: dict[str, Any] = {
        "name": "gaps-gbdt",
        "task": "classification",
        "data": {"source": str(csv), "target": "target"},
        "model": {"type": "gbdt", "n_estimators": 40, "num_leaves": 7, "min_child_samples": 5},
    }
    out = root / "gbdt"
    kiln.fit(spec, out=out)
    return out


@pytest.fixture
def bundle_copy(source: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(source, dest)
    return dest


def gappy_rows() -> pd.DataFrame:
    rows = table().iloc[:40].drop(columns="target").copy()
    rows.loc[rows.index[1], "color"] = "purple"  # unseen in training
    return rows


def test_export_writes_a_kiln_shaped_onnx_of_the_trees(bundle_copy: Path) -> None:
    import onnx

    before = json.loads((bundle_copy / "kiln.json").read_text())
    result = runner.invoke(app, ["export", str(bundle_copy)])
    assert result.exit_code == 0, result.output
    meta = json.loads((bundle_copy / "kiln.json").read_text())
    assert "model.onnx" in meta["files"] and meta["runtime"] == before["runtime"]
    graph = onnx.load_from_string((bundle_copy / "model.onnx").read_bytes()).graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["output"]
    assert any(n.op_type == "TreeEnsembleClassifier" for n in graph.node)

    loaded = Bundle.load(bundle_copy)
    assert loaded.backend.name == "lightgbm"  # runtime torch: the booster's own predictor
    from kiln.runtime.onnx import OnnxBackend

    x = loaded.preprocessor.transform(gappy_rows())
    assert np.isnan(x).any()  # missing values and an unseen category reach the trees
    raw = OnnxBackend(loaded.onnx or b"").forward(x)

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        out: np.ndarray = e / e.sum(axis=1, keepdims=True)
        return out

    np.testing.assert_allclose(
        softmax(raw), np.asarray(loaded.predict(gappy_rows()).probabilities), atol=1e-5
    )


def test_export_out_and_onnxruntime_runtime_serve_like_the_booster(
    bundle_copy: Path, tmp_path: Path
) -> None:
    """A model.onnx of trees behaves as any kiln model.onnx: runtime onnxruntime runs it."""
    from kiln.compress.export import export_bundle
    from kiln.manifest import Runtime

    target, diff = export_bundle(bundle_copy, tmp_path / "trees.onnx")
    assert diff < 1e-4 and target.is_file()
    native = Bundle.load(bundle_copy)
    variant = Bundle.load(bundle_copy)
    variant.onnx = target.read_bytes()
    variant.meta.runtime = Runtime(backend="onnxruntime")
    saved = variant.save(tmp_path / "variant")
    again = Bundle.load(saved)
    assert again.backend.name == "onnxruntime"
    rows = gappy_rows()
    assert again.predict(rows).predictions == native.predict(rows).predictions
    np.testing.assert_allclose(
        np.asarray(again.predict(rows).probabilities),
        np.asarray(native.predict(rows).probabilities),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"quantize": {"method": "int8_dynamic", "backend": "onnxruntime"}}, "steps.quantize"),
        ({"quantize": {"method": "int8_dynamic", "backend": "torch"}}, "steps.quantize"),
        ({"prune": {"method": "unstructured", "amount": 0.5}}, "steps.prune"),
    ],
)
def test_quantize_and_prune_of_trees_are_refused(
    source: Path,
    run_compress: Callable[..., Any],
    tmp_path: Path,
    step: dict[str, Any],
    field: str,
) -> None:
    with pytest.raises(SpecError) as caught:
        run_compress({"source": str(source), "steps": [step]}, tmp_path / "out", measure_runs=3)
    assert caught.value.field == field
    if "quantize" in step:
        assert "kiln export" in caught.value.message
    assert not (tmp_path / "out" / "01-quantize").exists()
    assert not (tmp_path / "out" / "01-prune").exists()


@pytest.mark.parametrize("student", [{"type": "mlp", "hidden": [16]}, {"type": "linear"}])
def test_distill_trees_into_a_network_with_its_own_preprocessing(
    source: Path, run_compress: Callable[..., Any], tmp_path: Path, student: dict[str, Any]
) -> None:
    spec = {
        "source": str(source),
        "steps": [
            {
                "distill": {
                    "student": student,
                    "epochs": 40,
                    "batch_size": 32,
                    "optimizer": {"lr": 0.02},
                }
            }
        ],
        "tolerance": {"metric": "accuracy", "max_drop": 0.15},
    }
    result = run_compress(spec, tmp_path / "out", measure_runs=3)
    (variant,) = result.variants
    assert variant.path == tmp_path / "out" / "01-distill"
    loaded = Bundle.load(variant.path)
    assert loaded.meta.model.type == student["type"]
    features = {f.name: f for f in loaded.preprocessor.state.features}
    # the student imputes, scales and one-hots: none of the teacher's native encoding
    assert features["a"].fill is not None and not features["a"].native_missing
    assert getattr(features["color"], "encoding", None) == "onehot"
    assert loaded.meta.n_inputs == 2 + 3  # a, b and one column per colour
    teacher = Bundle.load(source)
    assert teacher.preprocessor.state.features[0].native_missing  # the teacher is unchanged
    rows = gappy_rows()
    x = loaded.preprocessor.transform(rows)
    assert not np.isnan(x).any()
    assert len(loaded.predict(rows).predictions) == len(rows)  # nulls and unseen accepted
    report = json.loads((variant.path / "compression.json").read_text())
    metric = report["metric"]
    assert metric["drop"] <= 0.15
    assert metric["test"] >= metric["source_test"] - 0.15
    assert report["agreement_with_parent"] >= 0.8


def test_a_gbdt_student_is_refused(
    source: Path, run_compress: Callable[..., Any], tmp_path: Path
) -> None:
    spec = {
        "source": str(source),
        "steps": [{"distill": {"student": {"type": "gbdt", "n_estimators": 5}}}],
    }
    with pytest.raises(SpecError) as caught:
        run_compress(spec, tmp_path / "out", measure_runs=3)
    assert caught.value.field == "steps.distill.student.type"
