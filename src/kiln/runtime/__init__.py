"""Inference backends behind one small interface: torch (eager) and onnxruntime.

A backend maps an encoded batch (numpy: features, pixels or tokens) to raw outputs
(float32 logits or scaled values). Bundles choose theirs from ``kiln.json``
(``runtime.backend``); serving and compression measure through the same interface.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Raw outputs (N, O) float32 for an encoded batch (N, ...)."""
        ...
