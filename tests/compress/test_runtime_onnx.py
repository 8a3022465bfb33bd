"""The inference backends: ONNX export, the onnxruntime backend, the parity check, the
torch backend on quantized models, and the runtime's choice of backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kiln.errors import BundleError, ExportError, SpecError
from kiln.manifest import Runtime
from kiln.runtime.eager import TorchBackend
from kiln.runtime.onnx import PARITY_TOLERANCE, OnnxBackend, check_parity, export_onnx
from kiln.runtime.placement import cuda_available
from kiln.runtime.quantized import torch_int8
from kiln.runtime.select import recorded_backend, select_backend


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


# ---- the runtime's choice -------------------------------------------------------------

FP32 = Runtime()
TORCH_INT8 = Runtime(backend="torch", quantization="int8_dynamic")
ORT_INT8 = Runtime(backend="onnxruntime", quantization="int8_dynamic")


class NeedsTwo(nn.Module):
    """Runs in torch on nothing; its export on one input fails."""

    def forward(self, a, b):
        return a + b


def serve(model: nn.Module, runtime: Runtime, choice: str, onnx: bytes | None = None):
    sample = np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32)
    return select_backend(
        model, runtime, choice, onnx=onnx, example=torch.zeros(1, 5), samples=sample
    )


def test_a_bundle_runs_the_backend_its_runtime_record_names(sample):
    model = _model(0)
    fp32 = recorded_backend(model, FP32)
    assert isinstance(fp32, TorchBackend) and fp32.model is model
    int8 = recorded_backend(model, TORCH_INT8)
    assert isinstance(int8, TorchBackend)
    assert any("quantized" in type(m).__module__ for m in int8.model.modules())
    assert not any("quantized" in type(m).__module__ for m in model.modules())  # a copy
    graph = export_onnx(model, torch.zeros(1, 5))
    ort = recorded_backend(model, ORT_INT8, graph, threads=1)
    assert ort.name == "onnxruntime"
    np.testing.assert_allclose(ort.forward(sample), fp32.forward(sample), rtol=1e-4, atol=1e-5)
    with pytest.raises(BundleError, match=r"no model\.onnx"):
        recorded_backend(model, ORT_INT8)


@pytest.mark.skipif(cuda_available(), reason="checks the no-CUDA refusal")
def test_a_half_precision_variant_is_refused_without_a_gpu():
    with pytest.raises(BundleError, match="fp16 variant for GPUs"):
        recorded_backend(_model(0), Runtime(quantization="fp16"))


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_a_half_precision_variant_runs_on_the_gpu_in_half(sample):
    model = _model(0)
    backend = recorded_backend(model, Runtime(quantization="bf16"))
    assert isinstance(backend, TorchBackend)
    assert next(backend.model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).device.type == "cpu"  # the bundle keeps its fp32 copy
    out = backend.forward(sample)
    assert out.dtype == np.float32
    expected = model(torch.from_numpy(sample)).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=0.05, atol=0.05)


@pytest.mark.skipif(cuda_available(), reason="auto serves torch on CUDA")
def test_auto_serves_an_fp32_model_by_onnxruntime_when_its_export_agrees(sample):
    model = _model(0)
    chosen = serve(model, FP32, "auto")
    assert chosen.backend.name == "onnxruntime"
    assert chosen.parity is not None and 0.0 <= chosen.parity <= PARITY_TOLERANCE
    expected = model(torch.from_numpy(sample)).detach().numpy()
    np.testing.assert_allclose(chosen.backend.forward(sample), expected, rtol=1e-4, atol=1e-5)


def test_torch_is_served_when_asked_for_or_when_the_export_fails():
    assert serve(_model(0), FP32, "torch").backend.name == "torch"
    assert serve(_model(0), FP32, "torch").parity is None
    assert serve(NeedsTwo(), FP32, "auto").backend.name == "torch"
    with pytest.raises(SpecError) as info:
        serve(NeedsTwo(), FP32, "onnx")
    assert info.value.field == "backend"
    assert info.value.message.startswith("backend onnx: ONNX export failed")


def test_variants_are_served_on_their_own_backend():
    model = _model(0)
    for choice in ("auto", "onnx", "torch"):  # a torch int8 variant has no ONNX model
        chosen = serve(model, TORCH_INT8, choice)
        assert chosen.backend.name == "torch" and chosen.parity is None
    graph = export_onnx(model, torch.zeros(1, 5))
    for choice in ("auto", "onnx"):
        assert serve(model, ORT_INT8, choice, graph).backend.name == "onnxruntime"
    with pytest.raises(SpecError) as info:
        serve(model, ORT_INT8, "torch", graph)
    assert info.value.field == "backend"
    assert "has no torch backend" in info.value.message
