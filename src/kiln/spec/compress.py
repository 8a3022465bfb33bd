"""The compress spec: a source bundle, a chain of steps, and an accuracy tolerance."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from kiln.spec.base import StrictModel
from kiln.spec.model import ModelSpec
from kiln.spec.train import OptimizerSpec


class DistillSettings(StrictModel):
    """Train ``student`` to match the teacher (Hinton et al.): KL between outputs softened
    by ``temperature`` (times T²), mixed with the hard-label loss: alpha*soft + (1-alpha)*hard.
    For regression the soft target is the teacher's prediction (MSE)."""

    student: ModelSpec
    temperature: float = Field(default=4.0, gt=0.0)
    alpha: float = Field(default=0.7, ge=0.0, le=1.0)
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=32, ge=1)
    optimizer: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec(lr=3e-3))


class PruneSettings(StrictModel):
    """Magnitude pruning. ``structured`` removes whole neurons/channels (a smaller, faster
    model); ``unstructured``/``global`` zero individual weights per layer / across layers."""

    method: Literal["structured", "unstructured", "global"] = "structured"
    amount: float = Field(default=0.5, gt=0.0, lt=1.0)
    finetune_epochs: int = Field(default=3, ge=0)
    lr: float = Field(default=1e-3, gt=0.0, description="Fine-tuning learning rate (adam).")


class QuantizeSettings(StrictModel):
    """int8 dynamic quantization (weights int8, activations quantized on the fly), or a
    half-precision cast for GPUs. Generation bundles on ``onnxruntime`` get an
    onnxruntime-genai model instead: ``int4_weight`` (4-bit weights, backing off to 8-bit
    when out of tolerance) or, for ``int8_dynamic``, 8-bit weight-only quantization."""

    method: Literal["int8_dynamic", "int4_weight", "fp16", "bf16"] = "int8_dynamic"
    backend: Literal["onnxruntime", "torch"] = "onnxruntime"

    @model_validator(mode="after")
    def _backend_applies(self) -> QuantizeSettings:
        if self.method in ("fp16", "bf16") and self.backend != "torch":
            raise ValueError(f"{self.method} runs on the torch backend (a GPU)")
        if self.method == "int4_weight" and self.backend != "onnxruntime":
            raise ValueError("int4_weight runs on the onnxruntime backend (onnxruntime-genai)")
        return self


class DistillStep(StrictModel):
    distill: DistillSettings


class PruneStep(StrictModel):
    prune: PruneSettings


class QuantizeStep(StrictModel):
    quantize: QuantizeSettings


STEP_KINDS = ("distill", "prune", "quantize")


def _step_kind(value: Any) -> str | None:
    """A step is a mapping with exactly one key, its kind."""
    if isinstance(value, dict):
        keys = [k for k in value if k in STEP_KINDS]
        return keys[0] if len(keys) == 1 else None
    return next((k for k in STEP_KINDS if hasattr(value, k)), None)


Step = Annotated[
    Annotated[DistillStep, Tag("distill")]
    | Annotated[PruneStep, Tag("prune")]
    | Annotated[QuantizeStep, Tag("quantize")],
    Discriminator(
        _step_kind,
        custom_error_type="invalid_step",
        custom_error_message="each step is one of distill:, prune:, quantize:",
    ),
]


# Below 40 rows the 95% (Wilson) interval of a 90% accuracy is wider than 0.19 and one
# row moves the metric by more than 2.5 points: a check there cannot tell a sound
# variant from a broken one (on wine's 16 validation rows the interval is 0.64-0.97).
MIN_ROWS = 40


class Tolerance(StrictModel):
    """The largest absolute drop of ``metric`` (vs the source, on the held-out rows:
    validation + test) a variant may show; ``rmse``/``mae``/``mse``/``log_loss`` count a
    rise as a drop. Fewer held-out rows than ``min_rows`` is refused.

    Generation bundles: ``perplexity`` (the default there) is *relative*: ``max_drop:
    0.05`` lets the held-out perplexity rise by at most 5% over the source's;
    ``exact_match`` (greedy answers against the references) is an absolute drop. Rows
    are held-out examples."""

    metric: str = "accuracy"
    max_drop: float = Field(default=0.01, ge=0.0)
    retries: int = Field(default=3, ge=0, description="Back-off attempts per step.")
    min_rows: int = Field(
        default=MIN_ROWS,
        ge=1,
        description="Fewest held-out rows (validation + test) to check the tolerance on; "
        "lower it to accept a wider confidence interval.",
    )


class CompressSpec(StrictModel):
    """``kiln compress``: each step makes a bundle whose parent is the previous one."""

    source: str = Field(min_length=1, description="A bundle directory.")
    steps: Annotated[list[Step], Field(min_length=1)]
    tolerance: Tolerance | None = None
    data: str | None = Field(
        default=None,
        description="Labelled table for training students and checking the tolerance; "
        "default: the source's own training data and split, re-read and verified.",
    )
