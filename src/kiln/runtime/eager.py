"""The torch backend: eager execution in inference mode."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kiln.train.loop import predict_outputs


class TorchBackend:
    """Runs an ``nn.Module`` on CPU or its current device; inputs may be cast to
    ``dtype`` (fp16/bf16 variants)."""

    name = "torch"

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        self.model = model.eval()
        self.dtype = dtype

    def forward(self, x: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(x)
        # Fully int8-quantized models keep no parameters (packed weights); they run on CPU.
        first = next(iter(self.model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        out = predict_outputs(self.model, tensor.to(device))
        return out.cpu().numpy().astype(np.float32, copy=False)
