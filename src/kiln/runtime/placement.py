"""Where and at what precision a model runs: the one place that decides it.

Training, evaluation, compression and serving all ask for a :class:`Placement`
(a device and a precision) and run their forward passes inside
``placement.autocast()``; nothing else in kiln reads ``torch.cuda`` to choose a
device or a dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from kiln.data.text import is_tokens, trim_padding
from kiln.errors import BundleError, SpecError, TrainingError

Precision = Literal["fp32", "bf16", "fp16"]

# Rows per forward pass when predicting, to bound memory on large inputs.
EVAL_CHUNK = 8192
# Sequences and images cost far more memory per row than feature vectors.
EVAL_CHUNK_LARGE = 128

_HALF: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cuda_available() -> bool:
    """Whether a CUDA device is present (the one question every caller asks here)."""
    return torch.cuda.is_available()


def gpu_name() -> str | None:
    """The CUDA device's name, for reports; None without one."""
    return torch.cuda.get_device_name(0) if cuda_available() else None


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if name == "cuda" and not cuda_available():
        raise TrainingError(f"{field} is cuda but no CUDA device is available", field=field)
    return torch.device(name)


@dataclass(frozen=True)
class Placement:
    """A device and the precision of the forward pass on it.

    ``precision`` ``bf16`` runs forwards under bf16 autocast (weights stay fp32);
    ``weights`` is the dtype the weights are cast to (fp16/bf16 GPU variants), or None.
    """

    device: torch.device
    precision: Precision = "fp32"
    weights: torch.dtype | None = None

    @classmethod
    def for_training(cls, device: str, mixed_precision: str) -> Placement:
        """``train.device`` and ``train.mixed_precision``: bf16 autocast when asked for,
        or by default (``auto``) on CUDA; otherwise full precision."""
        where = resolve_device(device)
        bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and where.type == "cuda")
        return cls(where, "bf16" if bf16 else "fp32")

    @classmethod
    def for_variant(cls, quantization: str | None) -> Placement:
        """Where a bundle's variant runs: fp16/bf16 variants on CUDA with half weights
        (refused without a GPU), everything else on the CPU in fp32."""
        half = half_dtype(quantization)
        if half is None:
            return cls(torch.device("cpu"))
        if not cuda_available():
            raise BundleError(
                f"this bundle is a {quantization} variant for GPUs; no CUDA device here"
            )
        return cls(torch.device("cuda"), "fp16" if half is torch.float16 else "bf16", half)

    def autocast(self) -> Any:
        """The context forwards run in: bf16 autocast, or nothing."""
        if self.precision == "bf16" and self.weights is None:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` moved to this device (and cast to the half dtype of a GPU variant)."""
        if self.weights is not None:
            return model.to(self.device, dtype=self.weights)
        return model.to(self.device)


def half_dtype(quantization: str | None) -> torch.dtype | None:
    """The weights' dtype of an fp16/bf16 variant; None for every other variant."""
    return _HALF.get(quantization or "")


def require_cuda_for(method: str, field: str) -> None:
    """fp16/bf16 variants are for GPUs: refuse to make one without CUDA."""
    if not cuda_available():
        raise SpecError(
            f"{method} quantization targets GPUs and needs a CUDA device; "
            "on CPU use method: int8_dynamic",
            field=field,
        )


@torch.inference_mode()
def predict_outputs(model: nn.Module, x: torch.Tensor, autocast: Any = None) -> torch.Tensor:
    """Raw outputs (logits or scaled values) for ``x``, in eval mode, chunked; float32.

    Token inputs (N, 2, L) are trimmed to each chunk's longest row.
    """
    model.eval()
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    tokens = is_tokens(x)
    chunk = EVAL_CHUNK if x.dim() == 2 else EVAL_CHUNK_LARGE
    outs: list[torch.Tensor] = []
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        with ctx:
            outs.append(model(trim_padding(xb) if tokens else xb).float())
    if len(outs) == 1:  # one chunk: no copy
        return outs[0]
    return torch.cat(outs) if outs else torch.zeros(0)
