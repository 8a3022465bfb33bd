"""Multi-layer perceptron."""

from __future__ import annotations

from torch import nn

from kiln.models.layers import activation, initialise
from kiln.models.registry import register
from kiln.spec.model import MLPSpec


@register("mlp")
def build_mlp(spec: MLPSpec, n_inputs: int, n_outputs: int) -> nn.Module:
    """(B, F) -> [Linear -> BatchNorm? -> act -> Dropout?] x len(hidden) -> Linear -> (B, O)."""
    layers: list[nn.Module] = []
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
