"""Evaluation metrics, computed by scikit-learn.

Inputs are numpy arrays: class indices and probabilities (N, K) for
classification, values in the target's own units for regression. Outputs are
JSON-ready dicts of floats (and the confusion matrix as nested lists).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import numpy as np
from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict  # pydantic validates it on Python 3.11

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


@with_config(ConfigDict(extra="allow"))  # a manifest's metrics are kept as written
class Metrics(TypedDict, total=False):
    """One split's metric set, as kiln.json, the API and ``--json`` hold it.

    Classification fills the :data:`SCALAR_CLASSIFICATION` scores (``roc_auc`` only
    when defined) and ``confusion_matrix`` (rows: true class, columns: predicted);
    regression the :data:`SCALAR_REGRESSION` ones; generation ``loss``, ``perplexity`` and
    ``tokens``, and from generated answers the match rates. ``rows``/``rows_skipped`` are added
    by ``Bundle.evaluate``, ``epochs_run`` (and, for ``model.type: auto``, the model type
    ``selected``) by cross-validation's folds.
    """

    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    precision_weighted: float
    recall_weighted: float
    f1_weighted: float
    log_loss: float
    roc_auc: float
    confusion_matrix: list[list[int]]
    mse: float
    rmse: float
    mae: float
    r2: float
    rows: int
    rows_skipped: int
    epochs_run: int
    selected: str
    # generation: next-token loss over the answer tokens, exp(loss), and, from generated
    # text, the share of exact, normalised-text and JSON-equal answers and ROUGE-L (F)
    loss: float
    perplexity: float
    tokens: int
    exact_match: float
    normalized_match: float
    json_match: float
    rouge_l: float


def metric_value(metrics: Metrics, name: str) -> float:
    """The scalar metric ``name`` of a metric set (a name computed at run time).

    A KeyError, as indexing would raise, when the set has no such number.
    """
    value = cast(Mapping[str, object], metrics).get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise KeyError(name)
    return float(value)


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, n_classes: int | None = None
) -> Metrics:
    """All classification metrics from class indices (N,) and probabilities (N, K).

    ``roc_auc`` is the binary ROC-AUC for two classes and the one-vs-rest macro
    average for more; it is left out when the data holds a single class.
    """
    from sklearn import metrics as skm

    k = n_classes or proba.shape[1]
    labels = np.arange(k)
    y_pred = proba.argmax(axis=1)
    macro = _averaged(y_true, y_pred, labels, "macro")
    weighted = _averaged(y_true, y_pred, labels, "weighted")
    out: Metrics = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision_macro": macro[0],
        "recall_macro": macro[1],
        "f1_macro": macro[2],
        "precision_weighted": weighted[0],
        "recall_weighted": weighted[1],
        "f1_weighted": weighted[2],
    }
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


def _averaged(
    y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray, average: str
) -> tuple[float, float, float]:
    """Precision, recall and F1 under ``average`` (absent classes score 0)."""
    from sklearn import metrics as skm

    p, r, f, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=average, zero_division=0
    )
    return float(p), float(r), float(f)


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> Metrics:
    """MSE, RMSE, MAE and R² in the target's units."""
    from sklearn import metrics as skm

    mse = float(skm.mean_squared_error(y_true, y_pred))
    out: Metrics = {
        "mse": mse,
        "rmse": float(np.sqrt(mse)),
        "mae": float(skm.mean_absolute_error(y_true, y_pred)),
    }
    # R² is undefined for fewer than two rows.
    if len(y_true) >= 2:
        out["r2"] = float(skm.r2_score(y_true, y_pred))
    return out


def headline_metric(task: str) -> str:
    """The one number shown first: accuracy for classification, RMSE for regression,
    perplexity for generation."""
    return {"classification": "accuracy", "generation": "perplexity"}.get(task, "rmse")


def _clip(proba: np.ndarray) -> np.ndarray:
    # Renormalise float32 softmax rows so sklearn's sum-to-one check passes.
    p = np.clip(proba.astype(np.float64), 1e-15, 1.0)
    out: np.ndarray = p / p.sum(axis=1, keepdims=True)
    return out
