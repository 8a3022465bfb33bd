"""The inference backends: ONNX export, the onnxruntime backend, the parity check, and the
torch backend on quantized models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kiln.compress.quantize import torch_int8
from kiln.errors import ExportError
from kiln.runtime.eager import TorchBackend
from kiln.runtime.onnx import PARITY_TOLERANCE, OnnxBackend, check_parity, export_onnx


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)


def test_export_runs_in_onnxruntime_like_torch_with_a_dynamic_batch(sample):
    model = _model(0)
    graph = export_onnx(model, torch.zeros(1, 5))
    backend = OnnxBackend(graph, threads=1)
    assert backend.name == "onnxruntime"
    for rows in (sample[:1], sample):  # traced on one row, run on any batch
        out = backend.forward(rows)
        assert out.dtype == np.float32
        expected = model(torch.from_numpy(rows)).detach().numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_onnx_backend_reads_a_file_too(tmp_path, sample):
    model = _model(0)
    path = tmp_path / "m.onnx"
    path.write_bytes(export_onnx(model, torch.zeros(1, 5)))
    np.testing.assert_allclose(
        OnnxBackend(path).forward(sample),
        model(torch.from_numpy(sample)).detach().numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


def test_parity_check_passes_for_the_exported_model(sample):
    model = _model(0)
    diff = check_parity(model, export_onnx(model, torch.zeros(1, 5)), sample)
    assert 0.0 <= diff <= PARITY_TOLERANCE


def test_parity_check_raises_when_the_graph_is_another_model(sample):
    other = export_onnx(_model(1), torch.zeros(1, 5))
    with pytest.raises(ExportError, match="disagrees with torch"):
        check_parity(_model(0), other, sample)


def test_export_failure_is_an_export_error():
    class NeedsTwo(nn.Module):
        def forward(self, a, b):
            return a + b

    with pytest.raises(ExportError, match="ONNX export failed"):
        export_onnx(NeedsTwo(), torch.zeros(1, 5))


def test_torch_backend_runs_a_quantized_model_with_float_parameters_left(sample):
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    backend = TorchBackend(torch_int8(model))
    assert backend.name == "torch"
    out = backend.forward(sample)
    assert out.shape == (9, 3)
    assert out.dtype == np.float32


def test_torch_backend_runs_a_fully_quantized_model(sample):
    backend = TorchBackend(torch_int8(_model(0)))
    out = backend.forward(sample)
    assert out.shape == (9, 3)
