"""``kiln export``: ONNX written into the bundle (checksummed, still loadable) or to
``--out``, parity-checked against torch."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import kiln
from kiln.cli.main import app
from kiln.compress import export as export_module
from kiln.compress.export import export_bundle
from kiln.data.sources import read_table
from kiln.errors import ExportError

runner = CliRunner()


@pytest.fixture
def bundle_copy(iris_mlp, tmp_path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(iris_mlp, dest)
    return dest


def test_export_writes_model_onnx_into_the_bundle_and_it_still_loads(bundle_copy):
    before = json.loads((bundle_copy / "kiln.json").read_text())
    result = runner.invoke(app, ["export", str(bundle_copy), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    assert "model.onnx" in result.stdout
    assert (bundle_copy / "model.onnx").is_file()
    meta = json.loads((bundle_copy / "kiln.json").read_text())
    assert "model.onnx" in meta["files"]  # checksummed
    assert meta["runtime"] == before["runtime"]  # still served by torch
    loaded = kiln.load(str(bundle_copy))  # verifies every checksum
    assert loaded.onnx == (bundle_copy / "model.onnx").read_bytes()
    from kiln.runtime.onnx import OnnxBackend

    rows = read_table("sklearn:iris").drop(columns="target")
    x = loaded.preprocessor.transform(rows)
    np.testing.assert_allclose(
        OnnxBackend(loaded.onnx).forward(x), loaded.backend.forward(x), rtol=1e-4, atol=1e-4
    )
    assert sorted(p.name for p in bundle_copy.parent.iterdir()) == ["bundle"]  # no temp dirs


def test_export_out_writes_elsewhere_and_leaves_the_bundle_alone(bundle_copy, tmp_path):
    manifest = (bundle_copy / "kiln.json").read_bytes()
    target = tmp_path / "elsewhere.onnx"
    result = runner.invoke(app, ["export", str(bundle_copy), "--out", str(target)])
    assert result.exit_code == 0, result.output
    import onnx

    graph = onnx.load(str(target)).graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["output"]
    assert not (bundle_copy / "model.onnx").exists()
    assert (bundle_copy / "kiln.json").read_bytes() == manifest
    from kiln.runtime.onnx import OnnxBackend

    out = OnnxBackend(target).forward(np.zeros((3, 4), dtype=np.float32))
    assert out.shape == (3, 3)


def test_export_unknown_format_exits_3(bundle_copy):
    result = runner.invoke(app, ["export", str(bundle_copy), "--format", "tflite"])
    assert result.exit_code == 3
    assert "unknown export format" in result.output


def test_export_of_a_missing_bundle_exits_6(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "nowhere")])
    assert result.exit_code == 6


def test_export_bundle_returns_the_path_and_the_measured_difference(bundle_copy):
    path, diff = export_bundle(bundle_copy)
    assert path == bundle_copy / "model.onnx"
    assert 0.0 <= diff < 1e-3


def test_export_refuses_a_graph_that_disagrees_with_torch(bundle_copy, monkeypatch):
    real = export_module.export_onnx

    def other_model(model: nn.Module, example: torch.Tensor) -> bytes:
        wrong = copy.deepcopy(model)
        with torch.no_grad():
            for m in wrong.modules():
                if isinstance(m, nn.Linear):
                    m.bias.add_(1.0)
        return real(wrong, example)

    monkeypatch.setattr(export_module, "export_onnx", other_model)
    manifest = (bundle_copy / "kiln.json").read_bytes()
    with pytest.raises(ExportError, match="disagrees with torch"):
        export_bundle(bundle_copy)
    assert not (bundle_copy / "model.onnx").exists()
    assert (bundle_copy / "kiln.json").read_bytes() == manifest


def test_export_parity_uses_inputs_that_exercise_the_weights(bundle_copy, monkeypatch):
    real = export_module.export_onnx

    def wrong_first_layer(model: nn.Module, example: torch.Tensor) -> bytes:
        wrong = copy.deepcopy(model)
        first = next(m for m in wrong.modules() if isinstance(m, nn.Linear))
        with torch.no_grad():
            first.weight.mul_(-1.0)
        return real(wrong, example)

    monkeypatch.setattr(export_module, "export_onnx", wrong_first_layer)
    with pytest.raises(ExportError):
        export_bundle(bundle_copy)
