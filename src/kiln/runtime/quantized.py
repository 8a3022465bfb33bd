"""Quantized execution on the torch backend: dynamic int8 ``nn.Linear`` layers (CPU).

Bundles keep the fp32 weights of a torch int8 variant and quantize them again when
loaded (safetensors cannot hold packed int8 modules); dynamic quantization is
deterministic given those weights, so every load runs the same model.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def torch_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU with every nn.Linear dynamically quantized to int8
    (weights int8, activations quantized on the fly)."""
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao; it still works here.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call,no-any-return]
            model.cpu().eval(), {nn.Linear}, dtype=torch.qint8
        )
