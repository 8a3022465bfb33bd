"""Magnitude pruning.

``unstructured``/``global`` zero the smallest weights (per layer / across all layers)
with ``torch.nn.utils.prune`` and make the masks permanent: the model keeps its shape,
and the zeros only pay off with sparse kernels or compression. ``structured`` removes
whole neurons and channels with Torch-Pruning, which follows the dependencies between
layers (a conv's output channels, the next layer's inputs, a batch norm between), so the
saved model is smaller and faster. The output layer is never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from kiln.errors import SpecError
from kiln.spec.model import CNNSpec, MLPSpec

PRUNABLE = (nn.Linear, nn.Conv2d)


def prunable_layers(model: nn.Module) -> list[nn.Module]:
    """Linear and conv layers except the last one (the output layer)."""
    layers: list[nn.Module] = [m for m in model.modules() if isinstance(m, PRUNABLE)]
    return layers[:-1]


def unstructured_masks(model: nn.Module, amount: float, method: str) -> list[nn.Module]:
    """Mask the smallest ``amount`` of the weights of every hidden layer (``unstructured``)
    or of all of them together (``global``). The masks stay attached (so fine-tuning
    keeps pruned weights at zero) until ``prune.remove`` folds them in; returns the
    masked layers."""
    layers = prunable_layers(model) or [m for m in model.modules() if isinstance(m, PRUNABLE)]
    if method == "global":
        prune.global_unstructured(
            [(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=amount
        )
    else:
        for m in layers:
            prune.l1_unstructured(m, "weight", amount=amount)
    return layers


def structured(
    model: nn.Module, spec: Any, amount: float, example: torch.Tensor
) -> tuple[nn.Module, Any]:
    """Remove ``amount`` of the neurons/channels of every hidden layer (L2 magnitude).

    Returns the smaller model and the model spec that rebuilds its architecture.
    """
    import torch_pruning as tp

    if not isinstance(spec, MLPSpec | CNNSpec):
        raise SpecError(
            f"structured pruning supports mlp and cnn models, not {spec.type}; "
            "use method: unstructured or global",
            field="steps.prune.method",
        )
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE)]
    pruner = tp.pruner.MagnitudePruner(
        model,
        example_inputs=example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=amount,
        ignored_layers=[layers[-1]],
    )
    pruner.step()
    return model, _spec_of(model, spec)


def _spec_of(model: nn.Module, spec: MLPSpec | CNNSpec) -> MLPSpec | CNNSpec:
    """The spec whose builder gives ``model``'s (pruned) layer widths."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hidden = [m.out_features for m in linears[:-1]]
    if isinstance(spec, MLPSpec):
        return spec.model_copy(update={"hidden": hidden})
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return spec.model_copy(update={"channels": [m.out_channels for m in convs], "hidden": hidden})


@dataclass(frozen=True)
class Sparsity:
    """What is left of a model's weights."""

    parameters: int
    nonzeros: int
    sparsity: float  # the fraction of parameters that are zero


def sparsity(model: nn.Module) -> Sparsity:
    """Parameter count, non-zeros, and the fraction of zeros."""
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return Sparsity(params, nonzero, 1 - nonzero / max(params, 1))
