"""Linear models: linear regression, logistic/softmax regression, linear SVM (hinge loss)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kiln.models.layers import flatten_images, initialise
from kiln.models.registry import register
from kiln.spec.model import LinearSpec


@register("linear")
def build_linear(spec: LinearSpec, n_inputs: int, n_outputs: int, **context: Any) -> nn.Module:
    """One affine map (B, F) -> (B, O); the task's loss makes it a regressor or classifier.

    Image input (B, C, H, W) is flattened first.
    """
    model = nn.Sequential(*flatten_images(context), nn.Linear(n_inputs, n_outputs))
    initialise(model, spec.init, nonlinearity="linear")
    return model
