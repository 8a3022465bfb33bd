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
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        min_length=3,
        max_length=3,
        description="[C, H, W] for flat pixel columns; images give it themselves.",
    )
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
        if self.input_shape is None:
            return self
        _, h, w = self.input_shape
        if self.kernel_size > min(h, w):
            raise ValueError(f"kernel_size {self.kernel_size} is larger than the image {h}x{w}")
        return self


class TransformerSpec(StrictModel):
    """A Transformer encoder trained from scratch, with a tokenizer trained on the data.

    Embedding + learned positions -> ``layers`` encoder layers -> pooling -> head.
    """

    type: Literal["transformer"] = "transformer"
    layers: int = Field(default=2, ge=1)
    heads: int = Field(default=4, ge=1)
    dim: int = Field(default=128, ge=8)
    ff_dim: int | None = Field(default=None, ge=1, description="Default: 4 x dim.")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = Field(default=128, ge=4, le=4096)
    vocab_size: int = Field(default=8000, ge=100, description="Tokenizer vocabulary to learn.")
    lowercase: bool = True

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> TransformerSpec:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        return self


class LoraSpec(StrictModel):
    """Low-rank adapters (peft); the bundle stores the merged weights."""

    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1, description="Scaling numerator: updates x alpha / r.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        default=None, description="Module names to adapt; default: the attention projections."
    )


class PretrainedSpec(StrictModel):
    """Fine-tune a pretrained Hugging Face encoder (AutoModelForSequenceClassification).

    ``path`` is a local model directory, ``pkg:<python package>/<sub/dir>`` for a model
    shipped inside an installed package, or a hub id where ``KILN_ALLOW_HUB=1``; on the
    server only ``base:<name>`` (a base model of the catalog) or ``model:<name>[@<version>]``
    (a pretrained version of the same project). Remote code is never run.
    """

    type: Literal["pretrained"] = "pretrained"
    path: str = Field(min_length=1)
    max_length: int = Field(default=128, ge=4, le=4096)
    freeze: Literal["none", "embeddings", "encoder"] = "none"
    lora: LoraSpec | None = None

    @model_validator(mode="after")
    def _lora_or_freeze(self) -> PretrainedSpec:
        if self.lora is not None and self.freeze != "none":
            raise ValueError("lora already freezes the base model; leave freeze at none")
        return self


ModelSpec = Annotated[
    LinearSpec | MLPSpec | CNNSpec | TransformerSpec | PretrainedSpec,
    Field(discriminator="type"),
]
TEXT_MODELS = ("transformer", "pretrained")
