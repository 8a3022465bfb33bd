"""The ``train:`` section: loss, optimizer, batching, regularization, schedule."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kiln.spec.base import StrictModel

Loss = Literal["auto", "cross_entropy", "mse", "mae", "huber", "hinge", "token_cross_entropy"]
CLASSIFICATION_LOSSES = ("cross_entropy", "hinge")
REGRESSION_LOSSES = ("mse", "mae", "huber")


class OptimizerSpec(StrictModel):
    """Optimizer and its settings; keys that do not apply to ``name`` are rejected."""

    name: Literal["sgd", "adam", "adamw", "adagrad", "rmsprop"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0)
    momentum: float | None = Field(default=None, ge=0.0, lt=1.0)
    nesterov: bool | None = None
    weight_decay: float = Field(default=0.0, ge=0.0)
    betas: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _settings_apply(self) -> OptimizerSpec:
        if self.momentum is not None and self.name not in ("sgd", "rmsprop"):
            raise ValueError(f"momentum does not apply to {self.name}")
        if self.nesterov is not None and self.name != "sgd":
            raise ValueError(f"nesterov does not apply to {self.name}")
        if self.nesterov and not self.momentum:
            raise ValueError("nesterov needs momentum > 0")
        if self.betas is not None and self.name not in ("adam", "adamw"):
            raise ValueError(f"betas does not apply to {self.name}")
        return self


class Regularization(StrictModel):
    """Penalties added to the loss over weights (biases and norm layers excluded)."""

    l1: float = Field(default=0.0, ge=0.0)
    l2: float = Field(default=0.0, ge=0.0)


class LRSchedule(StrictModel):
    """Learning-rate schedule, stepped per optimizer step (plateau: per epoch)."""

    name: Literal["none", "step", "cosine", "linear", "plateau"] = "none"
    warmup: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Linear warm-up, as a fraction of all steps."
    )
    step_epochs: int = Field(default=10, ge=1, description="step: decay every N epochs.")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="step: decay factor.")
    factor: float = Field(default=0.1, gt=0.0, lt=1.0, description="plateau: decay factor.")
    patience: int = Field(default=3, ge=0, description="plateau: epochs without improvement.")
    min_lr: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _warmup_applies(self) -> LRSchedule:
        if self.name == "plateau" and self.warmup:
            raise ValueError("warmup does not combine with plateau")
        return self


class EarlyStopping(StrictModel):
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` epochs.

    The best epoch's weights are restored at the end.
    """

    patience: int = Field(default=5, ge=1)
    metric: str = Field(
        default="val_loss",
        description="val_loss, train_loss or val_<metric> (val_accuracy, val_f1_macro, "
        "val_r2, val_rmse, val_mae, val_mse).",
    )
    min_delta: float = Field(default=0.0, ge=0.0)
    restore_best: bool = True
    smoothing: Literal["auto", "none"] | Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default="auto",
        description="Compare an exponential moving average of the metric, s = a*v + "
        "(1-a)*s, for the best epoch and the patience count: a float is the weight a "
        "in (0, 1]; auto = 0.3 for a val_* metric on fewer than 200 validation rows, "
        "else none (raw values). Logged per epoch as <metric>_smoothed.",
    )
    folds: Literal["auto", "none"] | Annotated[int, Field(ge=2)] = Field(
        default="none",
        description="k-fold early stopping (costs about k+1 trainings): choose the "
        "epoch count on k folds of train+val (stratified for classification; the best "
        "epoch of the folds' mean val_* curve, patience applied to it), then train on "
        "all of train+val for that many epochs (no val metrics are reported). An int = "
        "k folds for any val_* metric; auto = 5 folds on fewer than 200 validation "
        "rows, else none; none (default) = stop on the validation split (smoothing "
        "applies).",
    )


class Resources(StrictModel):
    """Data-parallel training on a Ray cluster (when the worker has one: KILN_RAY_ADDRESS).

    Without a cluster the spec trains in the worker's own process, as if unset.
    """

    workers: int = Field(default=1, ge=1, le=1024, description="Ray Train workers (DDP ranks).")
    cpus_per_worker: float = Field(default=1.0, gt=0.0, le=1024.0)
    gpus_per_worker: float = Field(
        default=0.0, ge=0.0, le=64.0, description="0: gloo on the CPU; > 0: NCCL on CUDA."
    )


class TrainSpec(StrictModel):
    """How the weights are fitted."""

    loss: Loss = "auto"
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    batch_size: int | Literal["full"] = Field(
        default=32, description='Rows per step; "full" = full-batch, 1 = per-sample SGD.'
    )
    epochs: int = Field(default=20, ge=1)
    regularization: Regularization = Field(default_factory=Regularization)
    lr_schedule: LRSchedule = Field(default_factory=LRSchedule)
    early_stopping: EarlyStopping | None = None
    grad_clip: float | None = Field(default=None, gt=0.0, description="Max global grad norm.")
    gradient_accumulation: int = Field(
        default=1, ge=1, description="Micro-batches per optimizer step."
    )
    mixed_precision: Literal["auto", "bf16", "off"] = Field(
        default="auto", description="auto: bf16 autocast on CUDA, off on CPU."
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss_on: Literal["assistant", "all"] = Field(
        default="assistant",
        description="generation: train on the answer tokens only (chat and completion "
        "data), or on every token.",
    )
    packing: bool = Field(
        default=False,
        description="generation: pack short examples into max_length sequences.",
    )
    resources: Resources | None = Field(
        default=None,
        description="Train on a Ray cluster with this many workers (Ray Train, DDP).",
    )

    @model_validator(mode="after")
    def _batch_size_positive(self) -> TrainSpec:
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ValueError("batch_size must be >= 1 or 'full'")
        return self
