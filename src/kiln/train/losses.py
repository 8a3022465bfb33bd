"""Loss functions by spec name, and the weight penalties (L1/L2)."""

from __future__ import annotations

import torch
from torch import nn


class _Squeezed(nn.Module):
    """Regression losses compare outputs (B, 1) with targets (B,)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner(out.squeeze(-1), target)  # type: ignore[no-any-return]


def make_loss(name: str) -> nn.Module:
    """``cross_entropy`` and ``hinge`` (multi-class margin, a linear SVM on a linear model)
    take logits (B, K) and class indices (B,); ``mse``/``mae``/``huber`` take (B, 1) and (B,)."""
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()
    if name == "hinge":
        return nn.MultiMarginLoss()
    if name == "mse":
        return _Squeezed(nn.MSELoss())
    if name == "mae":
        return _Squeezed(nn.L1Loss())
    if name == "huber":
        return _Squeezed(nn.HuberLoss())
    raise ValueError(f"unknown loss {name!r}")


def penalised_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights that L1/L2 apply to: matrices and kernels, not biases or norm scales."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]


def weight_penalty(params: list[nn.Parameter], l1: float, l2: float) -> torch.Tensor | None:
    """``l1 * sum|w| + l2 * sum w^2`` over ``params``, or None when both are zero."""
    if not params or (l1 == 0 and l2 == 0):
        return None
    total = params[0].new_zeros(())
    for p in params:
        if l1:
            total = total + l1 * p.abs().sum()
        if l2:
            total = total + l2 * p.pow(2).sum()
    return total
