"""The engine's per-epoch validation: ``val_loss`` and the metrics a run logs or watches.

Kept lean on purpose: it runs every epoch and is part of the engine's overhead, so only
the headline metric is computed unless early stopping watches another one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.evaluate.token_loss import mean_token_loss, perplexity
from kiln.runtime.placement import predict_outputs


@dataclass(frozen=True)
class Validator:
    """What validating one run needs besides the model and the validation tensors."""

    task: str
    loss_fn: nn.Module
    autocast: Any  # the context every forward runs in (bf16 autocast or nothing)
    monitor: str | None  # the early-stopping metric, computed even when not headline
    target_scale: float  # regression: back to the target's units
    batch: int  # rows per forward pass for token inputs

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """``val_loss`` and the task's headline metric (plus the monitored one)."""
        if self.task == "generation":
            return self._tokens(model, x, y)
        out = predict_outputs(model, x, self.autocast)
        logs = {"val_loss": float(self.loss_fn(out, y))}
        if self.task == "classification":
            logs.update(self._classification(out, y, logs))
        else:
            logs.update(self._regression(out, y))
        return logs

    def _classification(
        self, out: torch.Tensor, y: torch.Tensor, logs: dict[str, float]
    ) -> dict[str, float]:
        from sklearn.metrics import accuracy_score

        from kiln.evaluate.metrics import classification_metrics, metric_value

        true = y.cpu().numpy()
        found = {"val_accuracy": float(accuracy_score(true, out.argmax(dim=1).cpu().numpy()))}
        monitor = self.monitor
        if monitor is not None and monitor not in {**logs, **found} and monitor != "train_loss":
            proba = torch.softmax(out, dim=1).cpu().numpy()
            full = classification_metrics(true, proba, n_classes=out.shape[1])
            found[monitor] = metric_value(full, monitor.removeprefix("val_"))
        return found

    def _regression(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        from kiln.evaluate.metrics import SCALAR_REGRESSION, metric_value, regression_metrics

        pred = out.squeeze(-1).cpu().numpy().astype(np.float64) * self.target_scale
        true = y.cpu().numpy().astype(np.float64) * self.target_scale
        scores = regression_metrics(true, pred)
        return {f"val_{k}": metric_value(scores, k) for k in SCALAR_REGRESSION if k in scores}

    def _tokens(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """A causal LM's val_loss (mean over every labelled token) and val_perplexity,
        in training-sized batches: the logits (B, L, V) of a whole split would not fit."""
        loss = mean_token_loss(model, x, y, self.batch, self.autocast)
        return {"val_loss": loss, "val_perplexity": perplexity(loss)}
