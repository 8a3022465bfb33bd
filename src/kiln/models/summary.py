"""Layer-by-layer summary of a model: names, output shapes, parameter counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: list[int]
    params: int
    trainable: int


def summarize(model: nn.Module, example: torch.Tensor | int) -> list[LayerRow]:
    """Run one example row through ``model`` and record each leaf module's output shape.

    ``example`` is an input batch of one, or a feature count for a zero row (1, F).
    """
    rows: list[LayerRow] = []
    hooks = []

    def hook(name: str) -> object:
        def record(module: nn.Module, _inp: object, out: object) -> None:
            params = sum(p.numel() for p in module.parameters(recurse=False))
            trainable = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
            rows.append(LayerRow(name, type(module).__name__, _shape(out), params, trainable))

        return record

    for name, module in model.named_modules():
        if name and not list(module.children()):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, example) if isinstance(example, int) else example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rows


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shape(out: object) -> list[int]:
    """Output shape without the batch dimension (first tensor of a tuple output)."""
    if isinstance(out, tuple | list) and out:
        out = out[0]
    return list(out.shape[1:]) if isinstance(out, torch.Tensor) else []
