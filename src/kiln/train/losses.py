"""Loss functions by spec name, and the weight penalties (L1/L2)."""

from __future__ import annotations

import torch
from torch import nn

from kiln.data.lm_encode import IGNORE


class _Squeezed(nn.Module):
    """Regression losses compare outputs (B, 1) with targets (B,)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner(out.squeeze(-1), target)  # type: ignore[no-any-return]


class TokenCrossEntropy(nn.Module):
    """Next-token cross-entropy of a causal LM: logits (B, L, V) at position t predict the
    label at t + 1; labels (B, L) hold -100 where no loss is taken (prompts, padding).

    The mean is over the labelled tokens of the batch (Hugging Face's convention).
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels[:, : logits.shape[1]]  # the batch's inputs were trimmed to its longest row
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B * (L - 1), V)
        return nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def make_loss(name: str) -> nn.Module:
    """``cross_entropy`` and ``hinge`` (multi-class margin, a linear SVM on a linear model)
    take logits (B, K) and class indices (B,); ``mse``/``mae``/``huber`` take (B, 1) and (B,);
    ``token_cross_entropy`` takes a causal LM's logits (B, L, V) and labels (B, L)."""
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
    if name == "token_cross_entropy":
        return TokenCrossEntropy()
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
