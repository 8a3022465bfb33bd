"""Metrics agree with scikit-learn; decoding outputs; scoring in target units."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from kiln.data.preprocess import Preprocessor
from kiln.data.schema import Column
from kiln.evaluate.metrics import classification_metrics, headline_metric, regression_metrics
from kiln.evaluate.scoring import decode, score
from kiln.spec import Preprocessing

Y3 = np.array([0, 1, 2, 2, 1, 0, 2, 1])
P3 = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.1, 0.6, 0.3],
        [0.2, 0.2, 0.6],
        [0.5, 0.1, 0.4],  # wrong: predicts 0
        [0.3, 0.4, 0.3],
        [0.4, 0.5, 0.1],  # wrong: predicts 1
        [0.1, 0.1, 0.8],
        [0.2, 0.7, 0.1],
    ]
)


def test_multiclass_metrics_match_sklearn():
    got = classification_metrics(Y3, P3)
    pred = P3.argmax(axis=1)
    assert got["accuracy"] == pytest.approx(0.75)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(Y3, pred))
    for avg in ("macro", "weighted"):
        assert got[f"f1_{avg}"] == pytest.approx(skm.f1_score(Y3, pred, average=avg))
        assert got[f"precision_{avg}"] == pytest.approx(skm.precision_score(Y3, pred, average=avg))
        assert got[f"recall_{avg}"] == pytest.approx(skm.recall_score(Y3, pred, average=avg))
    assert got["log_loss"] == pytest.approx(skm.log_loss(Y3, P3))
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(Y3, P3, multi_class="ovr"))
    assert got["confusion_matrix"] == skm.confusion_matrix(Y3, pred).tolist()


def test_binary_metrics_match_sklearn():
    y = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.6, 0.8, 0.4, 0.9, 0.2])
    proba = np.column_stack([1 - p1, p1])
    got = classification_metrics(y, proba)
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p1))
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["log_loss"] == pytest.approx(skm.log_loss(y, p1))


def test_missing_class_in_y_true_keeps_the_label_set():
    y = np.array([0, 0, 1, 1])  # class 2 never occurs in this split
    proba = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    got = classification_metrics(y, proba, n_classes=3)
    assert "roc_auc" not in got  # undefined without every class present
    assert np.array(got["confusion_matrix"]).shape == (3, 3)
    assert got["log_loss"] == pytest.approx(skm.log_loss(y, proba, labels=[0, 1, 2]))


def test_float32_probabilities_are_accepted():
    proba = torch.softmax(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), 1)
    got = classification_metrics(Y3, proba.numpy())
    assert 0.0 <= got["log_loss"] < 10


def test_regression_metrics_match_sklearn():
    y = np.array([3.0, -0.5, 2.0, 7.0])
    p = np.array([2.5, 0.0, 2.0, 8.0])
    got = regression_metrics(y, p)
    assert got["mse"] == pytest.approx(skm.mean_squared_error(y, p)) == pytest.approx(0.375)
    assert got["rmse"] == pytest.approx(np.sqrt(0.375))
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(y, p)) == pytest.approx(0.5)
    assert got["r2"] == pytest.approx(skm.r2_score(y, p))
    assert "r2" not in regression_metrics(np.array([1.0]), np.array([2.0]))


def test_headline_metric():
    assert headline_metric("classification") == "accuracy"
    assert headline_metric("regression") == "rmse"


def preprocessor(task: str, y) -> Preprocessor:
    frame = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "y": y})
    return Preprocessor.fit(frame, [Column(name="x", kind="numeric")], "y", task, Preprocessing())


def test_decode_gives_original_labels_and_probabilities():
    pre = preprocessor("classification", ["cat", "dog", "cat", "dog"])
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    got = decode(pre, logits.numpy())
    assert got.predictions == ["cat", "dog"]
    assert got.labels == ["cat", "dog"]
    assert got.probabilities is not None
    np.testing.assert_allclose(got.probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_regression_scores_are_in_target_units():
    y = np.array([100.0, 200.0, 300.0, 400.0])
    pre = preprocessor("regression", y)
    encoded = pre.transform_target(pd.Series(y))
    outputs = torch.from_numpy(encoded + 0.1).float()[:, None]  # 0.1 scaled units too high
    scale = pre.state.target.scale
    got = score(pre, outputs, encoded)
    assert got["mae"] == pytest.approx(0.1 * scale, rel=1e-4)
    decoded = decode(pre, outputs.numpy()).predictions
    np.testing.assert_allclose(decoded, y + 0.1 * scale, rtol=1e-5)
