"""Model registry: ``@register("mlp")`` maps a spec ``type`` to a builder.

A builder takes (model spec, number of input features, number of outputs) and
returns a plain ``nn.Module`` mapping a float tensor (B, F) to outputs (B, O).
New architectures plug in by registering; nothing else needs to change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from kiln.errors import SpecError

Builder = Callable[[Any, int, int], nn.Module]
_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Class/function decorator registering a builder under ``name``."""

    def deco(fn: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model type {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn

    return deco


def build(spec: Any, n_inputs: int, n_outputs: int) -> nn.Module:
    """Build the architecture ``spec.type`` with fresh (initialised) weights."""
    _load_builtins()
    try:
        builder = _BUILDERS[spec.type]
    except KeyError:
        raise SpecError(
            f"unknown model type {spec.type!r}; known: {sorted(_BUILDERS)}", field="model.type"
        ) from None
    return builder(spec, n_inputs, n_outputs)


def available() -> list[str]:
    _load_builtins()
    return sorted(_BUILDERS)


def _load_builtins() -> None:
    # Importing the modules runs their @register decorators.
    from kiln.models import cnn, linear, mlp  # noqa: F401
