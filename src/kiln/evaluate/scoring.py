"""Turn raw model outputs into predictions and metrics, given the fitted target encoding."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln.data.preprocess import Preprocessor
from kiln.evaluate.metrics import classification_metrics, regression_metrics


def decode_outputs(pre: Preprocessor, outputs: torch.Tensor) -> dict[str, Any]:
    """Outputs (N, K) or (N, 1) -> ``predictions`` (+ ``probabilities`` for classes).

    Class predictions are the original label values; probabilities follow ``labels``.
    """
    labels = pre.labels
    if labels is not None:
        proba = torch.softmax(outputs.float(), dim=1).cpu().numpy()
        idx = proba.argmax(axis=1)
        return {
            "predictions": [labels[i] for i in idx],
            "probabilities": proba,
            "labels": labels,
        }
    values = pre.inverse_target(outputs.float().squeeze(-1).cpu().numpy().astype(np.float64))
    return {"predictions": values.tolist(), "probabilities": None, "labels": None}


def score(pre: Preprocessor, outputs: torch.Tensor, y_encoded: np.ndarray) -> dict[str, Any]:
    """All metrics of the task for outputs against encoded targets."""
    if pre.labels is not None:
        proba = torch.softmax(outputs.float(), dim=1).cpu().numpy()
        return classification_metrics(y_encoded, proba, n_classes=len(pre.labels))
    pred = pre.inverse_target(outputs.float().squeeze(-1).cpu().numpy().astype(np.float64))
    true = pre.inverse_target(y_encoded.astype(np.float64))
    return regression_metrics(true, pred)
