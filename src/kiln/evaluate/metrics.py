"""Evaluation metrics, computed by scikit-learn.

Inputs are numpy arrays: class indices and probabilities (N, K) for
classification, values in the target's own units for regression. Outputs are
JSON-ready dicts of floats (and the confusion matrix as nested lists).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SCALAR_CLASSIFICATION = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "log_loss",
    "roc_auc",
)
SCALAR_REGRESSION = ("mse", "rmse", "mae", "r2")


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, n_classes: int | None = None
) -> dict[str, Any]:
    """All classification metrics from class indices (N,) and probabilities (N, K).

    ``roc_auc`` is the binary ROC-AUC for two classes and the one-vs-rest macro
    average for more; it is left out when the data holds a single class.
    """
    from sklearn import metrics as skm

    k = n_classes or proba.shape[1]
    labels = np.arange(k)
    y_pred = proba.argmax(axis=1)
    out: dict[str, Any] = {"accuracy": float(skm.accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=avg, zero_division=0
        )
        out[f"precision_{avg}"] = float(p)
        out[f"recall_{avg}"] = float(r)
        out[f"f1_{avg}"] = float(f)
    out["log_loss"] = float(skm.log_loss(y_true, _clip(proba), labels=labels))
    present = np.unique(y_true)
    if len(present) == 2 and k == 2:
        out["roc_auc"] = float(skm.roc_auc_score(y_true, proba[:, 1]))
    elif len(present) == k and k > 2:
        out["roc_auc"] = float(
            skm.roc_auc_score(y_true, _clip(proba), multi_class="ovr", labels=labels)
        )
    out["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MSE, RMSE, MAE and R² in the target's units."""
    from sklearn import metrics as skm

    mse = float(skm.mean_squared_error(y_true, y_pred))
    out = {
        "mse": mse,
        "rmse": float(np.sqrt(mse)),
        "mae": float(skm.mean_absolute_error(y_true, y_pred)),
    }
    # R² is undefined for fewer than two rows.
    if len(y_true) >= 2:
        out["r2"] = float(skm.r2_score(y_true, y_pred))
    return out


def headline_metric(task: str) -> str:
    """The one number shown first: accuracy for classification, RMSE for regression."""
    return "accuracy" if task == "classification" else "rmse"


def _clip(proba: np.ndarray) -> np.ndarray:
    # Renormalise float32 softmax rows so sklearn's sum-to-one check passes.
    p = np.clip(proba.astype(np.float64), 1e-15, 1.0)
    out: np.ndarray = p / p.sum(axis=1, keepdims=True)
    return out
