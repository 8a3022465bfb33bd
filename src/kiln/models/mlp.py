"""Multi-layer perceptron."""

from __future__ import annotations

from typing import Any

from torch import nn

from kiln.models.layers import dense_stack, flatten_images, initialise
from kiln.models.registry import register
from kiln.spec.model import MLPSpec


@register("mlp")
def build_mlp(spec: MLPSpec, n_inputs: int, n_outputs: int, **context: Any) -> nn.Module:
    """(B, F) -> [Linear -> BatchNorm? -> act -> Dropout?] x len(hidden) -> Linear -> (B, O).

    Image input (B, C, H, W) is flattened first.
    """
    layers = flatten_images(context)
    layers += dense_stack(n_inputs, spec.hidden, spec.activation, spec.dropout, spec.batch_norm)
    layers.append(nn.Linear(spec.hidden[-1] if spec.hidden else n_inputs, n_outputs))
    model = nn.Sequential(*layers)
    initialise(model, spec.init, nonlinearity=spec.activation)
    return model
