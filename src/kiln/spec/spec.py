"""The whole training spec: ``name``, ``task``, ``data``, ``model``, ``train``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kiln.spec.base import StrictModel
from kiln.spec.data import DATASET_PREFIX, DataSpec
from kiln.spec.model import TEXT_MODELS, ModelSpec
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
        # Cross-section checks. Messages start with the dotted key they are about
        # ("train.loss: ..."), which the loader reports as the error's field.
        loss = self.train.loss
        if self.task == "classification" and loss in REGRESSION_LOSSES:
            raise ValueError(f"train.loss: {loss!r} is for regression, but task is classification")
        if self.task == "regression" and loss in CLASSIFICATION_LOSSES:
            raise ValueError(f"train.loss: {loss!r} is for classification, but task is regression")
        es = self.train.early_stopping
        if es is not None:
            allowed = monitorable_metrics(self.task)
            if es.metric not in allowed:
                raise ValueError(
                    f"train.early_stopping.metric: {es.metric!r} is not one of {list(allowed)}"
                )
            if es.metric.startswith("val_") and self.data.split.val == 0:
                raise ValueError(
                    "train.early_stopping.metric: needs a validation split (data.split.val > 0)"
                )
        text_model = self.model.type in TEXT_MODELS
        if text_model and self.data.text is None:
            raise ValueError(f"data.text: model type {self.model.type} needs the text column")
        if self.data.text is not None and not text_model:
            raise ValueError(
                f"model.type: data.text needs a text model (transformer or pretrained), "
                f"not {self.model.type}"
            )
        is_image = self.data.image is not None or self.data.is_image_folder
        if is_image and self.model.type not in ("cnn", "mlp", "linear"):
            raise ValueError(
                f"model.type: images need a cnn, mlp or linear model, not {self.model.type}"
            )
        # a server's dataset:<id> may be an image folder; the worker checks again on it
        maybe_image = is_image or self.data.source.startswith(DATASET_PREFIX)
        if self.model.type == "cnn" and not maybe_image and self.model.input_shape is None:
            raise ValueError(
                "model.input_shape: a cnn on table columns needs [C, H, W] "
                "(images give it themselves)"
            )
        if self.train.lr_schedule.name == "plateau" and self.data.split.val == 0:
            raise ValueError("train.lr_schedule: plateau needs a validation split (data.split.val)")
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
