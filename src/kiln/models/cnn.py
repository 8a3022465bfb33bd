"""Convolutional network for image-shaped input (flat pixel columns are reshaped)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kiln.errors import SpecError
from kiln.models.layers import activation, dense_stack, initialise
from kiln.models.registry import register
from kiln.spec.model import CNNSpec


class Reshape(nn.Module):
    """(B, C*H*W) -> (B, C, H, W); a no-op for input already image-shaped."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


@register("cnn")
def build_cnn(spec: CNNSpec, n_inputs: int, n_outputs: int, **context: Any) -> nn.Module:
    """Reshape -> [Conv(same) -> BN? -> act -> MaxPool] per channel count -> FC head.

    Images give their own [C, H, W] (context ``input_shape``); flat pixel columns need
    ``model.input_shape``.
    """
    data_shape = context.get("input_shape")
    shape = spec.input_shape or (data_shape if data_shape and len(data_shape) == 3 else None)
    if shape is None:
        raise SpecError(
            "a cnn on table columns needs model.input_shape [C, H, W]", field="model.input_shape"
        )
    c, h, w = shape
    if spec.kernel_size > min(h, w):
        raise SpecError(
            f"model.kernel_size {spec.kernel_size} is larger than the image {h}x{w}",
            field="model.kernel_size",
        )
    if c * h * w != n_inputs:
        raise SpecError(
            f"model.input_shape {list(shape)} holds {c * h * w} values but the data has "
            f"{n_inputs} feature columns",
            field="model.input_shape",
        )
    layers: list[nn.Module] = [Reshape((c, h, w))]
    channels = c
    for out_ch in spec.channels:
        layers.append(nn.Conv2d(channels, out_ch, spec.kernel_size, padding="same"))
        if spec.batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(activation(spec.activation))
        # Pool only while the image is still large enough to shrink.
        if spec.pool > 1 and min(h, w) >= spec.pool:
            layers.append(nn.MaxPool2d(spec.pool))
            h, w = math.floor(h / spec.pool), math.floor(w / spec.pool)
        channels = out_ch
    layers.append(nn.Flatten())
    width = channels * h * w
    layers += dense_stack(width, spec.hidden, spec.activation, spec.dropout)
    layers.append(nn.Linear(spec.hidden[-1] if spec.hidden else width, n_outputs))
    model = nn.Sequential(*layers)
    initialise(model, spec.init, nonlinearity=spec.activation)
    return model
