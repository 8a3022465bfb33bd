"""int8 dynamic quantization: onnxruntime's quantizer on the ONNX graph, or torch's own
(``torch_int8``, which lives with the runtime: bundles apply it again at load).

Dynamic quantization stores weights as int8 and quantizes activations on the fly, so it
needs no calibration data. Layers can be left in fp32 (``exclude``) when quantizing them
costs too much accuracy; ``sensitivity`` ranks layers by the output error each one adds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# Graph ops onnxruntime's dynamic quantizer turns into int8 kernels.
QUANTIZABLE_OPS = ("MatMul", "Gemm")


def quantizable_nodes(onnx_model: bytes) -> list[str]:
    """Names of the graph's MatMul/Gemm nodes with a constant (weight) input."""
    import onnx

    graph = onnx.load_from_string(onnx_model).graph
    weights = {init.name for init in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type in QUANTIZABLE_OPS and any(i in weights for i in node.input)
    ]


def ort_int8(onnx_model: bytes, exclude: list[str] | None = None) -> bytes:
    """onnxruntime dynamic int8 quantization (per-channel weights) of an fp32 graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = exclude or []
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_model)
        with warnings.catch_warnings(), _quiet_root_logger():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(src),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=True,
                # Without VNNI, int8 x int8 products can saturate the 16-bit
                # accumulators of the AVX2 kernels; 7-bit weights avoid that.
                reduce_range=not has_vnni(),
                op_types_to_quantize=list(QUANTIZABLE_OPS),
                # The quantizer rewrites Gemm nodes into MatMul ones named "<gemm>_MatMul"
                # before it applies exclusions; name both.
                nodes_to_exclude=[*excluded, *(f"{n}_MatMul" for n in excluded)],
            )
        return dst.read_bytes()


@functools.cache
def has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI)."""
    from kiln.compress.measure import machine

    return any("vnni" in flag for flag in machine()["cpu_flags"])


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # The quantizer advises pre-processing through the root logger on every call.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def sensitivity(onnx_model: bytes, sample: np.ndarray) -> list[tuple[str, float]]:
    """(node, error) for each quantizable node, most sensitive first: the mean absolute
    output change when that node alone is quantized."""
    from kiln.runtime.onnx import OnnxBackend

    reference = OnnxBackend(onnx_model).forward(sample)
    nodes = quantizable_nodes(onnx_model)
    scores = []
    for node in nodes:
        others = [n for n in nodes if n != node]
        out = OnnxBackend(ort_int8(onnx_model, exclude=others)).forward(sample)
        scores.append((node, float(np.abs(out - reference).mean())))
    return sorted(scores, key=lambda item: -item[1])
