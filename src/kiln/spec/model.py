"""The ``model:`` section: one architecture per ``type``, tagged union."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kiln.spec.base import StrictModel

Activation = Literal["relu", "gelu", "tanh", "sigmoid", "leaky_relu", "elu", "silu"]
Init = Literal["xavier", "kaiming", "normal", "zeros", "default"]


class LinearSpec(StrictModel):
    """Linear/logistic/softmax regression; a linear SVM with ``train.loss: hinge``."""

    type: Literal["linear"] = "linear"
    init: Init = "xavier"


class MLPSpec(StrictModel):
    """Fully connected network: Linear -> [BatchNorm] -> activation -> Dropout, per layer."""

    type: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64, 32])
    activation: Activation = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False
    init: Init = "kaiming"


class CNNSpec(StrictModel):
    """Conv blocks (conv -> activation -> max-pool) then a fully connected head.

    ``input_shape`` [C, H, W] reshapes flat pixel columns into an image.
    """

    type: Literal["cnn"] = "cnn"
    input_shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=3, max_length=3)
    channels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [16, 32])
    kernel_size: int = Field(default=3, ge=1)
    pool: int = Field(default=2, ge=1, description="Max-pool size after each block; 1 = none.")
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64])
    activation: Activation = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False
    init: Init = "kaiming"

    @model_validator(mode="after")
    def _kernel_fits(self) -> CNNSpec:
        _, h, w = self.input_shape
        if self.kernel_size > min(h, w):
            raise ValueError(f"kernel_size {self.kernel_size} is larger than the image {h}x{w}")
        return self


ModelSpec = Annotated[LinearSpec | MLPSpec | CNNSpec, Field(discriminator="type")]
