"""The torch backend: eager execution in inference mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from kiln.runtime.placement import predict_outputs


@contextlib.contextmanager
def no_mha_fastpath() -> Iterator[None]:
    """Run nn.TransformerEncoderLayer without its fused inference kernel: the ONNX
    exporter has no equivalent for it, and it reads ``linear.weight`` as a tensor, which
    int8-quantized Linear layers do not have."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


class TorchBackend:
    """Runs an ``nn.Module`` on CPU or its current device; inputs may be cast to
    ``dtype`` (fp16/bf16 variants). ``fastpath=False`` for int8-quantized models."""

    name = "torch"

    def __init__(
        self, model: nn.Module, dtype: torch.dtype | None = None, fastpath: bool = True
    ) -> None:
        self.model = model.eval()
        self.dtype = dtype
        self.fastpath = fastpath

    def forward(self, x: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(x)
        # Fully int8-quantized models keep no parameters (packed weights); they run on CPU.
        first = next(iter(self.model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        with contextlib.nullcontext() if self.fastpath else no_mha_fastpath():
            out = predict_outputs(self.model, tensor.to(device))
        return out.cpu().numpy().astype(np.float32, copy=False)
