"""Turn raw model outputs into predictions and metrics, given the fitted target encoding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.data.preprocess import Preprocessor
from kiln.data.preprocess_state import JSONScalar
from kiln.evaluate.metrics import Metrics, classification_metrics, regression_metrics


@dataclass
class Decoded:
    """Predictions for a batch: a label (classification) or a number (regression) per
    row; for classes, ``probabilities`` (N, K) ordered like ``labels``."""

    predictions: list[JSONScalar]
    probabilities: np.ndarray | None
    labels: list[JSONScalar] | None


def decode(pre: Preprocessor, outputs: np.ndarray) -> Decoded:
    """Raw outputs (N, K) logits or (N, 1) scaled values as predictions, in numpy.

    numpy rather than torch: a torch softmax wakes torch's thread pool, whose threads
    then spin on the cores a server needs (twice the CPU of the call itself).
    """
    labels = pre.labels
    if labels is None:  # regression: back in the target's units
        values = pre.inverse_target(outputs.squeeze(-1).astype(np.float64))
        return Decoded(values.tolist(), None, None)
    logits = outputs.astype(np.float32, copy=False)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    proba = exp / exp.sum(axis=1, keepdims=True)
    return Decoded([labels[i] for i in proba.argmax(axis=1)], proba, labels)


def score(pre: Preprocessor, outputs: torch.Tensor, y_encoded: np.ndarray) -> Metrics:
    """All metrics of the task for outputs against encoded targets."""
    if pre.labels is not None:
        proba = torch.softmax(outputs.float(), dim=1).cpu().numpy()
        return classification_metrics(y_encoded, proba, n_classes=len(pre.labels))
    pred = pre.inverse_target(outputs.float().squeeze(-1).cpu().numpy().astype(np.float64))
    true = pre.inverse_target(y_encoded.astype(np.float64))
    return regression_metrics(true, pred)
