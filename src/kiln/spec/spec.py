"""The whole training spec: ``name``, ``task``, ``data``, ``model``, ``train``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kiln.spec.base import StrictModel
from kiln.spec.data import DATASET_PREFIX, FOLDER_LABEL, DataSpec, Preprocessing
from kiln.spec.model import LM_MODELS, TEXT_MODELS, TREE_MODELS, ModelSpec
from kiln.spec.train import (
    CLASSIFICATION_LOSSES,
    REGRESSION_LOSSES,
    LRSchedule,
    OptimizerSpec,
    TrainSpec,
)

Task = Literal["classification", "regression", "generation"]

# Names become directory and registry names: keep them path-safe.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

CLASSIFICATION_METRICS = ("accuracy", "f1_macro", "f1_weighted", "log_loss")
REGRESSION_METRICS = ("mse", "rmse", "mae", "r2")
GENERATION_METRICS = ("perplexity",)


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
        if self.task == "generation":
            _check_generation(self)
        else:
            _check_predictive(self)
        es = self.train.early_stopping
        if es is not None:
            allowed = monitorable_metrics(self.task)
            if es.metric not in allowed:
                raise ValueError(
                    f"train.early_stopping.metric: {es.metric!r} is not one of {list(allowed)}"
                )
            if es.metric.startswith("val_") and not self.data.has_validation:
                raise ValueError(
                    "train.early_stopping.metric: needs a validation split (data.split.val > 0"
                    " or, for generation, data.validation)"
                )
        if self.train.lr_schedule.name == "plateau" and not self.data.has_validation:
            raise ValueError("train.lr_schedule: plateau needs a validation split (data.split.val)")
        return self

    @property
    def resolved_loss(self) -> str:
        """The loss actually used: ``auto`` becomes cross_entropy, mse or (generation)
        token_cross_entropy by task."""
        if self.train.loss != "auto":
            return self.train.loss
        return {"classification": "cross_entropy", "generation": "token_cross_entropy"}.get(
            self.task, "mse"
        )

    @property
    def preprocessing(self) -> Preprocessing:
        """``data.preprocessing`` as the model uses it: trees keep missing values and
        categories native, and unscaled, unless the spec says otherwise."""
        given = self.data.preprocessing
        if self.model.type not in TREE_MODELS:
            return given
        tree_defaults = {"missing": "native", "categorical": "native", "scale": "none"}
        update = {k: v for k, v in tree_defaults.items() if k not in given.model_fields_set}
        return given.model_copy(update=update)


def _check_generation(spec: Spec) -> None:
    """A generation spec: a causal LM or a gpt, trained with the token loss."""
    if spec.model.type not in LM_MODELS:
        raise ValueError(
            f"model.type: task generation needs causal_lm or gpt, not {spec.model.type}"
        )
    if spec.train.loss not in ("auto", "token_cross_entropy"):
        raise ValueError(
            f"train.loss: {spec.train.loss!r} is not for generation (auto or token_cross_entropy)"
        )
    for key in ("image", "features", "augment"):
        if getattr(spec.data, key) is not None:
            raise ValueError(f"data.{key}: does not apply to task generation")
    # a non-default value only: a dumped spec (a bundle's lineage) holds the default
    if spec.data.target != FOLDER_LABEL:
        raise ValueError("data.target: does not apply to task generation (the text is the target)")
    if spec.data.format in ("chat", "completion") and spec.data.text is not None:
        raise ValueError(f"data.text: names the column of format text, not {spec.data.format}")


def _check_predictive(spec: Spec) -> None:
    """Classification and regression: the table's target, the model for its inputs."""
    if "target" not in spec.data.model_fields_set and not spec.data.maybe_folder:
        raise ValueError("data.target: required key is missing (only an image folder may omit it)")
    if spec.data.format is not None:
        raise ValueError("data.format: applies to task generation only")
    if spec.data.validation is not None:
        raise ValueError(
            "data.validation: applies to task generation only (tables use data.split.val)"
        )
    # non-default values only: a dumped spec (lineage, dump_spec) holds every default
    if spec.train.loss_on != "assistant" or spec.train.packing:
        key = "packing" if spec.train.packing else "loss_on"
        raise ValueError(f"train.{key}: applies to task generation only")
    if spec.model.type in LM_MODELS:
        raise ValueError(f"model.type: {spec.model.type} is for task generation")
    if spec.model.type == "sentence_encoder":
        raise ValueError(
            "model.type: sentence_encoder bundles are made by kiln import, not trained"
        )
    loss = spec.train.loss
    if loss == "token_cross_entropy":
        raise ValueError("train.loss: token_cross_entropy is for task generation")
    if spec.task == "classification" and loss in REGRESSION_LOSSES:
        raise ValueError(f"train.loss: {loss!r} is for regression, but task is classification")
    if spec.task == "regression" and loss in CLASSIFICATION_LOSSES:
        raise ValueError(f"train.loss: {loss!r} is for classification, but task is regression")
    text_model = spec.model.type in TEXT_MODELS
    if text_model and spec.data.text is None:
        raise ValueError(f"data.text: model type {spec.model.type} needs the text column")
    if spec.data.text is not None and not text_model:
        raise ValueError(
            f"model.type: data.text needs a text model (transformer or pretrained), "
            f"not {spec.model.type}"
        )
    _check_tables_only(spec)
    is_image = spec.data.image is not None or spec.data.is_image_folder
    if is_image and spec.model.type not in ("cnn", "mlp", "linear"):
        raise ValueError(
            f"model.type: images need a cnn, mlp or linear model, not {spec.model.type}"
        )
    # a server's dataset:<id> may be an image folder; the worker checks again on it
    maybe_image = is_image or spec.data.source.startswith(DATASET_PREFIX)
    if spec.model.type == "cnn" and not maybe_image and spec.model.input_shape is None:
        raise ValueError(
            "model.input_shape: a cnn on table columns needs [C, H, W] (images give it themselves)"
        )


# Engine settings a tree model has no use for, at their defaults (a dumped spec holds
# every default, so only other values are refused).
_TORCH_ONLY = {
    "optimizer": OptimizerSpec(),
    "batch_size": 32,
    "epochs": 20,
    "lr_schedule": LRSchedule(),
    "grad_clip": None,
    "gradient_accumulation": 1,
}
TREE_METRICS = (
    "val_loss",
    "train_loss",
    "val_accuracy",
    "val_log_loss",
    "val_mse",
    "val_rmse",
    "val_mae",
    "val_r2",
)


def _check_tables_only(spec: Spec) -> None:
    """gbdt and auto: tables only; settings of the torch engine do not apply to trees."""
    model = spec.model
    pre = spec.data.preprocessing
    native = [k for k in ("missing", "categorical") if getattr(pre, k) == "native"]
    if native and model.type not in TREE_MODELS:
        raise ValueError(
            f"data.preprocessing.{native[0]}: native is for tree models (gbdt); "
            f"{model.type} needs numbers (impute, onehot or ordinal)"
        )
    if model.type not in (*TREE_MODELS, "auto"):
        return
    if spec.data.text is not None or spec.data.image is not None or spec.data.is_image_folder:
        raise ValueError(f"model.type: {model.type} is for tables, not text or images")
    if spec.train.resources is not None:
        raise ValueError(
            f"train.resources: {model.type} trains in one process (the boosting library's "
            "threads); Ray workers train the torch engine's models"
        )
    if model.type == "auto":
        return
    for key, default in _TORCH_ONLY.items():
        if getattr(spec.train, key) != default:
            raise ValueError(
                f"train.{key}: does not apply to gbdt (boosting rounds: model.n_estimators)"
            )
    if spec.train.loss in ("hinge",):
        raise ValueError("train.loss: hinge does not apply to gbdt")
    if model.type == "gbdt" and model.class_weight is not None and spec.task != "classification":
        raise ValueError("model.class_weight: applies to classification only")
    es = spec.train.early_stopping
    if es is not None and es.metric not in TREE_METRICS:
        raise ValueError(
            f"train.early_stopping.metric: {es.metric!r} is not one gbdt tracks per round; "
            f"use one of {[m for m in TREE_METRICS if m in monitorable_metrics(spec.task)]}"
        )
    # boosting stops on the raw per-round value; these would be silently ignored
    if es is not None and (es.folds != "none" or es.smoothing not in ("auto", "none")):
        raise ValueError(
            "train.early_stopping.folds/smoothing: do not apply to gbdt (it stops on the "
            "raw validation value of each round); leave them unset"
        )


def monitorable_metrics(task: str) -> tuple[str, ...]:
    """Metric names that early stopping and the plateau schedule may watch."""
    names = {"classification": CLASSIFICATION_METRICS, "generation": GENERATION_METRICS}.get(
        task, REGRESSION_METRICS
    )
    return ("val_loss", "train_loss", *(f"val_{n}" for n in names))


def metric_mode(metric: str) -> Literal["min", "max"]:
    """Whether a larger value of ``metric`` is better (max) or worse (min)."""
    bare = metric.removeprefix("val_").removeprefix("train_")
    return "max" if bare in ("accuracy", "f1_macro", "f1_weighted", "r2") else "min"
