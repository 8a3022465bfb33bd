"""Building blocks shared by architectures: activations and weight initialisation."""

from __future__ import annotations

from collections.abc import Mapping, Sized
from typing import Any

from torch import nn

_GAINS = ("linear", "relu", "leaky_relu", "tanh", "sigmoid")

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


def initialise(module: nn.Module, scheme: str, nonlinearity: str = "relu") -> None:
    """Initialise every Linear/Conv weight with ``scheme``; biases start at zero.

    ``default`` keeps PyTorch's own initialisation.
    """
    if scheme == "default":
        return
    # torch's gain table knows these; smooth ReLU variants (gelu, elu, silu) use relu's.
    gain_name: Any = nonlinearity if nonlinearity in _GAINS else "relu"
    for m in module.modules():
        if not isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
            continue
        if scheme == "xavier":
            nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain(gain_name))
        elif scheme == "kaiming":
            nn.init.kaiming_normal_(m.weight, nonlinearity=gain_name)
        elif scheme == "normal":
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        elif scheme == "zeros":
            nn.init.zeros_(m.weight)
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def dense_stack(
    width: int, sizes: list[int], act: str, dropout: float, batch_norm: bool = False
) -> list[nn.Module]:
    """Linear -> [BatchNorm1d] -> activation -> [Dropout] for each size in ``sizes``."""
    layers: list[nn.Module] = []
    for size in sizes:
        layers.append(nn.Linear(width, size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(activation(act))
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    return layers


def flatten_images(context: Mapping[str, object]) -> list[nn.Module]:
    """[Flatten] when the input is image-shaped (context input_shape [C, H, W]), else []."""
    shape = context.get("input_shape")
    return [nn.Flatten()] if isinstance(shape, Sized) and len(shape) == 3 else []
