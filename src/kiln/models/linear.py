"""Linear models: linear regression, logistic/softmax regression, linear SVM (hinge loss)."""

from __future__ import annotations

from torch import nn

from kiln.models.layers import initialise
from kiln.models.registry import register
from kiln.spec.model import LinearSpec


@register("linear")
def build_linear(spec: LinearSpec, n_inputs: int, n_outputs: int) -> nn.Module:
    """One affine map (B, F) -> (B, O); the task's loss makes it a regressor or classifier."""
    model = nn.Sequential(nn.Linear(n_inputs, n_outputs))
    initialise(model, spec.init, nonlinearity="linear")
    return model
