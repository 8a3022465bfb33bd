"""A Transformer encoder for text classification/regression, trained from scratch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.models.layers import initialise
from kiln.models.registry import register
from kiln.spec.model import TransformerSpec


class TextTransformer(nn.Module):
    """Tokens (B, 2, L) [ids; mask] -> embeddings + positions -> encoder -> pool -> (B, O)."""

    def __init__(self, spec: TransformerSpec, vocab_size: int, n_outputs: int, pad_id: int):
        super().__init__()
        self.pooling = spec.pooling
        self.embed = nn.Embedding(vocab_size, spec.dim, padding_idx=pad_id)
        self.position = nn.Embedding(spec.max_length, spec.dim)
        layer = nn.TransformerEncoderLayer(
            d_model=spec.dim,
            nhead=spec.heads,
            dim_feedforward=spec.ff_dim or 4 * spec.dim,
            dropout=spec.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,  # pre-norm trains stably without warm-up tricks
        )
        self.encoder = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(spec.dim)
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(spec.dim, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]  # (B, L) each
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.position(positions)  # (B, L, D)
        h = self.encoder(h, src_key_padding_mask=mask == 0)
        h = self.norm(h)
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
            pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))  # type: ignore[no-any-return]


@register("transformer")
def build_transformer(
    spec: TransformerSpec, n_inputs: int, n_outputs: int, **context: Any
) -> nn.Module:
    """``n_inputs`` is the tokenizer's vocabulary size; ``pad_id`` comes from the tokenizer."""
    model = TextTransformer(spec, n_inputs, n_outputs, int(context.get("pad_id", 0)))
    initialise(model.head, "xavier", nonlinearity="linear")
    return model
