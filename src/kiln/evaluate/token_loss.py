"""A causal LM's next-token loss over labelled tokens, and its perplexity.

Logits (B, L, V) at position t predict the label at t + 1; labels (B, L) hold -100
where no loss is taken (prompts, padding). Training (the engine's validation) and
evaluation both measure through these functions.
"""

from __future__ import annotations

import contextlib
import math
from contextlib import AbstractContextManager

import torch
from torch import nn

from kiln.data.lm_encode import IGNORE


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The summed next-token loss of a batch and the number of labelled tokens in it.

    ``labels`` may be longer than ``logits`` (inputs trimmed to the batch's longest row).
    """
    labels = labels[:, : logits.shape[1]]
    target = labels[:, 1:].reshape(-1)
    total = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),  # (B * (L - 1), V)
        target,
        ignore_index=IGNORE,
        reduction="sum",
    )
    return total, int((target != IGNORE).sum())


def mean_token_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    autocast: AbstractContextManager[object] | None = None,
) -> float:
    """The next-token loss of ``model`` over every labelled token of inputs ``x``
    (N, 2, L) and labels ``y`` (N, L), in batches of ``batch`` rows (the logits of a
    whole split would not fit in memory)."""
    from kiln.data.text import trim_padding

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode(), autocast if autocast is not None else contextlib.nullcontext():
        for start in range(0, len(x), batch):
            xb = trim_padding(x[start : start + batch].to(device))
            summed, n = token_loss_sum(model(xb).float(), y[start : start + batch].to(device))
            total, count = total + float(summed), count + n
    model.train(was_training)
    return total / max(count, 1)


def perplexity(mean_loss: float) -> float:
    """exp(mean loss), capped where it would overflow a float."""
    return math.exp(min(mean_loss, 700.0))
