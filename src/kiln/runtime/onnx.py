"""ONNX export and the onnxruntime backend.

Every kiln model takes one input tensor named ``input`` (features (N, F), pixels
(N, C, H, W) or tokens (N, 2, L)) and gives one output ``output`` (N, O). The batch
axis, and for tokens the length axis, are dynamic.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kiln.data.text import is_tokens, trim_padding
from kiln.errors import ExportError
from kiln.runtime.eager import no_mha_fastpath

OPSET = 17
# Largest |torch - onnxruntime| difference accepted for an fp32 export, relative to the
# outputs' scale.
PARITY_TOLERANCE = 1e-3


def export_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """Serialise ``model`` (fp32, eval mode, CPU) to ONNX bytes, traced on ``example``."""
    model = model.eval().cpu()
    dynamic = {"input": {0: "batch"}, "output": {0: "batch"}}
    if is_tokens(example):
        dynamic["input"][2] = "length"
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad(), no_mha_fastpath():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                buffer,  # type: ignore[arg-type]  # the exporter writes to file objects too
                input_names=["input"],
                output_names=["output"],
                dynamic_axes=dynamic,
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {str(exc).splitlines()[0]}") from None
    return buffer.getvalue()


class OnnxBackend:
    """onnxruntime on the CPU (or CUDA when its provider is present), pinned threads."""

    name = "onnxruntime"

    def __init__(
        self, model: bytes | str | Path, threads: int | None = None, *, spinning: bool = True
    ) -> None:
        """``spinning=False``: idle threads sleep at once instead of busy-waiting for
        the next run; a server wants the cores for its other work between batches."""
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # errors surface as exceptions, not log lines
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        providers = [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
        ]
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=providers)
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 3

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 3 and x.dtype == np.int64 and x.shape[1] == 2:
            x = trim_padding(torch.from_numpy(x)).numpy()
        (out,) = self.session.run(["output"], {"input": x}, self._run_options)
        return np.asarray(out, dtype=np.float32)


def check_parity(model: nn.Module, onnx_model: bytes, sample: np.ndarray) -> float:
    """Max |torch - onnxruntime| on ``sample`` relative to the outputs' scale; raises
    ExportError past PARITY_TOLERANCE."""
    from kiln.runtime.eager import TorchBackend

    expected = TorchBackend(model).forward(sample)
    try:
        got = OnnxBackend(onnx_model).forward(sample)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(
            "the ONNX export does not run on inputs shaped unlike the traced example "
            f"({str(exc).splitlines()[0][:160]}); this model type cannot be served by "
            "onnxruntime yet: use the torch backend"
        ) from None
    if got.shape != expected.shape:
        raise ExportError(
            f"the ONNX export gives outputs of shape {list(got.shape)} where torch gives "
            f"{list(expected.shape)}: the graph only fits the traced input's shape; "
            "use the torch backend"
        )
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(expected - got).max()) / scale
    if diff > PARITY_TOLERANCE:
        raise ExportError(f"the ONNX export disagrees with torch (max relative diff {diff:.2e})")
    return diff
