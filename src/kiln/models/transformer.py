"""A Transformer encoder for text classification/regression, trained from scratch.

The encoder block is written out (pre-norm attention and MLP, PyTorch's fused
``scaled_dot_product_attention``) rather than taken from ``nn.TransformerEncoder``,
whose inference fast path neither exports to ONNX with dynamic shapes nor survives
int8 quantization of its Linear layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the conventional name

from kiln.models.layers import initialise
from kiln.models.registry import register
from kiln.spec.model import TransformerSpec


class EncoderBlock(nn.Module):
    """h + Attention(LN(h)), then h + MLP(LN(h)); (B, L, D) -> (B, L, D)."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, length, dim = h.shape
        # (B, L, 3D) -> 3 x (B, heads, L, D/heads)
        q, k, v = (
            self.qkv(self.norm1(h)).reshape(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        )
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0
        )  # (B, heads, L, D/heads)
        h = h + self.drop(self.proj(attn.transpose(1, 2).reshape(b, length, dim)))
        return h + self.drop(self.mlp(self.norm2(h)))  # type: ignore[no-any-return]


class TextTransformer(nn.Module):
    """Tokens (B, 2, L) [ids; mask] -> embeddings + positions -> encoder -> pool -> (B, O)."""

    def __init__(self, spec: TransformerSpec, vocab_size: int, n_outputs: int, pad_id: int):
        super().__init__()
        self.pooling = spec.pooling
        self.embed = nn.Embedding(vocab_size, spec.dim, padding_idx=pad_id)
        self.position = nn.Embedding(spec.max_length, spec.dim)
        self.blocks = nn.ModuleList(
            EncoderBlock(spec.dim, spec.heads, spec.ff_dim or 4 * spec.dim, spec.dropout)
            for _ in range(spec.layers)
        )
        self.norm = nn.LayerNorm(spec.dim)
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(spec.dim, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]  # (B, L) each
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.dropout(self.embed(ids) + self.position(positions))  # (B, L, D)
        keep = (mask != 0)[:, None, None, :]  # (B, 1, 1, L): attend to real tokens only
        for block in self.blocks:
            h = block(h, keep)
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
