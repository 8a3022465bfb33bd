"""Multi-layer perceptron."""

from __future__ import annotations

from typing import Any

from torch import nn

from kiln.models.layers import activation, flatten_images, initialise
from kiln.models.registry import register
from kiln.spec.model import MLPSpec


@register("mlp")
def build_mlp(spec: MLPSpec, n_inputs: int, n_outputs: int, **context: Any) -> nn.Module:
    """(B, F) -> [Linear -> BatchNorm? -> act -> Dropout?] x len(hidden) -> Linear -> (B, O).

    Image input (B, C, H, W) is flattened first.
    """
    layers: list[nn.Module] = flatten_images(context)
    width = n_inputs
    for size in spec.hidden:
        layers.append(nn.Linear(width, size))
        if spec.batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(activation(spec.activation))
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = size
    layers.append(nn.Linear(width, n_outputs))
    model = nn.Sequential(*layers)
    initialise(model, spec.init, nonlinearity=spec.activation)
    return model
