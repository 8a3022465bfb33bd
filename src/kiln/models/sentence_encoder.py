"""Sentence encoders: a pretrained Hugging Face encoder whose token states are
mean-pooled over the attention mask and L2-normalised (what sentence-transformers'
MiniLM models do), for ``task: embedding`` bundles made by ``kiln import``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import JsonValue
from torch import nn

from kiln.models.registry import register
from kiln.spec.model import SentenceEncoderSpec


class SentenceEncoder(nn.Module):
    """Tokens (B, 2, L) [ids; mask] -> unit vectors (B, D)."""

    def __init__(self, hf: nn.Module, *, normalize: bool = True) -> None:
        super().__init__()
        self.hf = hf
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x[:, 1]
        states = self.hf(input_ids=x[:, 0], attention_mask=mask).last_hidden_state  # (B, L, D)
        weights = mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def hf_config(self) -> dict[str, JsonValue]:
        hf: Any = self.hf
        config: dict[str, JsonValue] = hf.config.to_dict()
        return config

    @property
    def dimensions(self) -> int:
        hf: Any = self.hf
        return int(hf.config.hidden_size)


@register("sentence_encoder")
def build_sentence_encoder(
    spec: SentenceEncoderSpec, n_inputs: int, n_outputs: int, **context: Any
) -> nn.Module:
    """From ``context['hf_config']`` (a bundle: empty weights to be loaded), or else the
    pretrained encoder at ``spec.path``."""
    from transformers import AutoConfig, AutoModel

    if "hf_config" in context:
        cfg = dict(context["hf_config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        return SentenceEncoder(AutoModel.from_config(config), normalize=spec.normalize)
    from kiln.models.lm_source import load_sentence_encoder, resolve_lm_source

    hf, _ = load_sentence_encoder(resolve_lm_source(spec.path))
    return SentenceEncoder(hf, normalize=spec.normalize)


def embed(
    model: nn.Module, tokenizer: Any, texts: list[str], *, max_length: int, batch: int = 32
) -> np.ndarray:
    """(N, D) float32 embeddings of ``texts``, ``batch`` texts per forward pass."""
    from kiln.data.text import encode

    out: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            x = torch.from_numpy(encode(tokenizer, texts[start : start + batch], max_length))
            out.append(model(x).float().numpy())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)
