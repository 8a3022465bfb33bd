"""The whole training spec: ``name``, ``task``, ``data``, ``model``, ``train``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kiln.spec.base import StrictModel
from kiln.spec.data import DataSpec
from kiln.spec.model import ModelSpec
from kiln.spec.train import CLASSIFICATION_LOSSES, REGRESSION_LOSSES, TrainSpec

Task = Literal["classification", "regression"]

# Names become directory and registry names: keep them path-safe.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

CLASSIFICATION_METRICS = ("accuracy", "f1_macro", "f1_weighted", "log_loss")
REGRESSION_METRICS = ("mse", "rmse", "mae", "r2")


class Spec(StrictModel):
    """A declarative description of one model: what data, which architecture, how to fit."""

    name: str = Field(pattern=NAME_PATTERN)
    task: Task
    data: DataSpec
    model: ModelSpec
    train: TrainSpec = Field(default_factory=TrainSpec)

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        loss = self.train.loss
        if self.task == "classification" and loss in REGRESSION_LOSSES:
            raise ValueError(f"train.loss {loss!r} is for regression, but task is classification")
        if self.task == "regression" and loss in CLASSIFICATION_LOSSES:
            raise ValueError(f"train.loss {loss!r} is for classification, but task is regression")
        es = self.train.early_stopping
        if es is not None:
            allowed = monitorable_metrics(self.task)
            if es.metric not in allowed:
                raise ValueError(
                    f"train.early_stopping.metric {es.metric!r} is not one of {list(allowed)}"
                )
            if es.metric.startswith("val_") and self.data.split.val == 0:
                raise ValueError(
                    "train.early_stopping.metric needs a validation split (data.split.val > 0)"
                )
        if self.train.lr_schedule.name == "plateau" and self.data.split.val == 0:
            raise ValueError("train.lr_schedule plateau needs a validation split (data.split.val)")
        return self

    @property
    def resolved_loss(self) -> str:
        """The loss actually used: ``auto`` becomes cross_entropy or mse by task."""
        if self.train.loss != "auto":
            return self.train.loss
        return "cross_entropy" if self.task == "classification" else "mse"


def monitorable_metrics(task: str) -> tuple[str, ...]:
    """Metric names that early stopping and the plateau schedule may watch."""
    names = CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS
    return ("val_loss", "train_loss", *(f"val_{n}" for n in names))


def metric_mode(metric: str) -> Literal["min", "max"]:
    """Whether a larger value of ``metric`` is better (max) or worse (min)."""
    bare = metric.removeprefix("val_").removeprefix("train_")
    return "max" if bare in ("accuracy", "f1_macro", "f1_weighted", "r2") else "min"
