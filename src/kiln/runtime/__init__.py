"""Inference backends behind one small interface: torch (eager) and onnxruntime.

A backend maps an encoded batch (numpy: features, pixels or tokens) to raw outputs
(float32 logits or scaled values). Which one runs a bundle, on which device and at
which precision, is decided in ``kiln.runtime.select`` from its ``kiln.json``
``runtime`` record (``kiln.runtime.placement`` for devices and precisions,
``kiln.runtime.quantized`` for torch int8); the library, serving and compression all
run and measure through this interface.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

ServingChoice = Literal["auto", "torch", "onnx"]
"""A server's backend: ``auto`` (onnxruntime on the CPU when an export of the fp32
model agrees with torch, else torch), or ``torch``/``onnx`` explicitly."""


class Backend(Protocol):
    name: str

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Raw outputs (N, O) float32 for an encoded batch (N, ...)."""
        ...
