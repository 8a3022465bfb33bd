"""Model registry: ``@register("mlp")`` maps a spec ``type`` to a builder.

A builder takes (model spec, number of inputs, number of outputs, **context) and
returns a plain ``nn.Module`` mapping one input tensor to outputs (B, O): features
(B, F), images (B, C, H, W) or tokens (B, 2, L). ``context`` carries JSON facts the
data decides (``input_shape``, ``pad_id``, a pretrained model's ``hf_config``); the
bundle stores it, so loading rebuilds exactly the same architecture. New
architectures plug in by registering; nothing else needs to change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from kiln.errors import SpecError

Builder = Callable[..., nn.Module]
_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Class/function decorator registering a builder under ``name``."""

    def deco(fn: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model type {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn

    return deco


def build(spec: Any, n_inputs: int, n_outputs: int, **context: Any) -> nn.Module:
    """Build the architecture ``spec.type`` with fresh (initialised) weights."""
    _load_builtins()
    try:
        builder = _BUILDERS[spec.type]
    except KeyError:
        raise SpecError(
            f"unknown model type {spec.type!r}; known: {sorted(_BUILDERS)}", field="model.type"
        ) from None
    return builder(spec, n_inputs, n_outputs, **context)


def available() -> list[str]:
    _load_builtins()
    return sorted(_BUILDERS)


def _load_builtins() -> None:
    # Importing the modules runs their @register decorators.
    from kiln.models import (  # noqa: F401
        causal_lm,
        cnn,
        gbdt,
        linear,
        mlp,
        pretrained,
        sentence_encoder,
        transformer,
    )
