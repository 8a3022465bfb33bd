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


class LMLoraSpec(StrictModel):
    """Low-rank adapters (peft) for a causal LM.

    ``merge: true`` (the default) folds them into the saved weights, so the bundle serves
    like a full fine-tune; ``merge: false`` keeps them as an adapter beside a reference
    to the base weights.
    """

    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1, description="Scaling numerator: updates x alpha / r.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target: Literal["auto"] | list[Annotated[str, Field(min_length=1)]] = Field(
        default="auto",
        description="Module names to adapt; auto: the attention and MLP projections.",
    )
    merge: bool = True

    @model_validator(mode="after")
    def _targets_named(self) -> LMLoraSpec:
        if isinstance(self.target, list) and not self.target:
            raise ValueError("target must name at least one module (or be auto)")
        return self


class CausalLMSpec(StrictModel):
    """Fine-tune a pretrained causal language model (AutoModelForCausalLM).

    ``path`` is a Hugging Face model directory, a ``.gguf`` file (dequantised by
    transformers' GGUF loader), ``pkg:<package>/<file or dir>`` for weights shipped in an
    installed package, or a hub id where ``KILN_ALLOW_HUB=1``; through a kiln server only
    ``base:<name>``. Remote code is never run. Without ``lora`` every weight trains.
    """

    type: Literal["causal_lm"] = "causal_lm"
    path: str = Field(min_length=1)
    max_length: int = Field(default=512, ge=8, le=32768, description="Tokens per example.")
    lora: LMLoraSpec | None = None


class GPTSpec(StrictModel):
    """A decoder-only Transformer trained from scratch (a Llama-style block: RMSNorm,
    rotary positions, SwiGLU), with a byte-level BPE tokenizer learned from the
    training split."""

    type: Literal["gpt"] = "gpt"
    layers: int = Field(default=4, ge=1)
    heads: int = Field(default=4, ge=1)
    dim: int = Field(default=128, ge=8)
    ff_dim: int | None = Field(default=None, ge=1, description="Default: 4 x dim.")
    max_length: int = Field(default=256, ge=8, le=32768, description="The context, in tokens.")
    vocab_size: int = Field(default=4000, ge=300, description="BPE vocabulary to learn.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> GPTSpec:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if (self.dim // self.heads) % 2:
            raise ValueError(f"dim / heads ({self.dim // self.heads}) must be even (rotary)")
        return self


class SentenceEncoderSpec(StrictModel):
    """A pretrained sentence encoder imported as it is (``kiln import``): token
    embeddings mean-pooled over the attention mask, then L2-normalised. Not trainable
    from a spec."""

    type: Literal["sentence_encoder"] = "sentence_encoder"
    path: str = Field(min_length=1)
    max_length: int = Field(default=256, ge=4, le=32768)
    pooling: Literal["mean"] = "mean"
    normalize: bool = True


class GBDTSpec(StrictModel):
    """Gradient-boosted decision trees (LightGBM or XGBoost) on a table.

    Categorical columns go to the library's own categorical splits and missing values
    in as missing (``data.preprocessing`` defaults to ``missing: native`` and
    ``categorical: native`` for this model). L1/L2 come from ``train.regularization``;
    ``train.early_stopping`` stops boosting after ``patience`` rounds without
    improvement on the validation split and keeps the best round.
    """

    type: Literal["gbdt"] = "gbdt"
    library: Literal["lightgbm", "xgboost"] = "lightgbm"
    n_estimators: int = Field(default=500, ge=1, le=100_000, description="Boosting rounds.")
    learning_rate: float = Field(default=0.05, gt=0.0, le=1.0)
    num_leaves: int = Field(default=31, ge=2, le=131_072, description="Leaves per tree.")
    max_depth: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Depth limit; default: none for lightgbm, 6 for xgboost.",
    )
    min_child_samples: int = Field(default=20, ge=1, description="Rows a leaf must hold.")
    subsample: float = Field(default=1.0, gt=0.0, le=1.0, description="Row fraction per round.")
    colsample: float = Field(default=1.0, gt=0.0, le=1.0, description="Column fraction per tree.")
    class_weight: Literal["balanced"] | dict[str, Annotated[float, Field(gt=0.0)]] | None = Field(
        default=None,
        description="classification: balanced (inverse class frequency) or a weight per label.",
    )
    threads: int | None = Field(default=None, ge=1, description="Default: torch's CPU threads.")


AutoCandidate = Literal["linear", "mlp", "gbdt"]
AUTO_CANDIDATES: tuple[AutoCandidate, ...] = ("linear", "mlp", "gbdt")


class AutoSpec(StrictModel):
    """Model selection for tables: train each candidate (with its defaults) and keep the
    one with the best validation score (k-fold cross-validation on the training rows
    when the table is small); every candidate's score is reported."""

    type: Literal["auto"] = "auto"
    candidates: list[AutoCandidate] = Field(
        default_factory=lambda: list(AUTO_CANDIDATES), min_length=1
    )
    folds: int = Field(
        default=5, ge=2, le=20, description="k for tables under small_rows training rows."
    )
    small_rows: int = Field(
        default=2000, ge=0, description="Below this many training rows, compare by k-fold."
    )

    @model_validator(mode="after")
    def _distinct(self) -> AutoSpec:
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates are listed twice")
        return self


ModelSpec = Annotated[
    LinearSpec
    | MLPSpec
    | CNNSpec
    | TransformerSpec
    | PretrainedSpec
    | CausalLMSpec
    | GPTSpec
    | SentenceEncoderSpec
    | GBDTSpec
    | AutoSpec,
    Field(discriminator="type"),
]
TREE_MODELS = ("gbdt",)
TEXT_MODELS = ("transformer", "pretrained")
LM_MODELS = ("causal_lm", "gpt")
