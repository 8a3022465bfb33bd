"""``kiln.json``: the bundle's manifest, typed.

Version 2 (this kiln writes it) types every section a reader looks into: how the
bundle runs (:class:`Runtime`), how it was trained (:class:`TrainingRecord`), where
it came from (:class:`Lineage`) and its architecture (a ``ModelSpec``). Version 1
manifests held the same keys as free-form JSON; :func:`parse_manifest` reads both.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from kiln.data.preprocess_state import JSONScalar
from kiln.data.schema import Column
from kiln.errors import BundleError
from kiln.evaluate.metrics import Metrics
from kiln.spec.model import AutoCandidate, ModelSpec

FORMAT = "kiln.bundle"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

JSONDocument = dict[str, JsonValue]
"""Free-form JSON kept verbatim (a spec as written, a step's settings, a report)."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _SparseRecord(_Record):
    """A record whose unknown (None) fields are left out of the JSON, as version 1
    left them out: a variant has no job, a trained model no step."""

    @model_serializer(mode="wrap")
    def _without_nones(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}


class Runtime(_Record):
    """How the bundle runs: the backend and the quantized execution, if any."""

    backend: Literal["torch", "onnxruntime", "onnxruntime-genai"] = "torch"
    # int8_dynamic: torch's or onnxruntime's dynamic int8; fp16/bf16: half weights on CUDA;
    # int4_weight/int8_weight: an onnxruntime-genai model's weight-only quantization
    quantization: Literal["int8_dynamic", "fp16", "bf16", "int4_weight", "int8_weight"] | None = (
        None
    )
    # onnxruntime int8: layers left in fp32 because quantizing them cost accuracy
    excluded: list[str] = []

    @model_serializer(mode="wrap")
    def _excluded_when_any(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # only onnxruntime variants leave layers out; the torch ones' JSON has no such key
        data: dict[str, Any] = handler(self)
        if self.backend == "torch" and not self.excluded:
            data.pop("excluded", None)
        return data


class TokenRecord(_Record):
    """A language model's training split in tokens (per epoch)."""

    tokens: int  # real (non-padding) tokens
    trained: int  # of which carry a label (the answers, with loss_on: assistant)
    truncated: int  # examples cut at max_length
    truncated_lines: list[int] = []  # the first 20 of their lines in the data file


class CandidateRecord(_SparseRecord):
    """One candidate of ``model.type: auto``: its validation score (the mean over
    folds for k-fold, with their sample std) and, for classification, its log loss
    (the tie-break)."""

    type: AutoCandidate
    score: float
    std: float | None = None
    log_loss: float | None = None
    seconds: float | None = None


class SelectionRecord(_SparseRecord):
    """How ``model.type: auto`` chose the model: by ``metric`` (accuracy or r2) over
    k-fold cross-validation of the non-test rows or on the validation split."""

    metric: Literal["accuracy", "r2"]
    method: Literal["kfold", "holdout"]
    folds: int | None = None  # k-fold only
    candidates: list[CandidateRecord]
    winner: AutoCandidate


class EpochChoiceRecord(_Record):
    """How k-fold early stopping chose the epoch count: the best epoch of the folds'
    mean ``metric`` curve (``mean_curve[t - 1]``: after epoch t), then one fit on
    train+val for that many epochs; ``seconds``: the fold runs."""

    by: Literal["kfold"] = "kfold"
    folds: int
    metric: str
    best_epoch: int
    best_value: float
    mean_curve: list[float]
    seconds: float


class TrainingRecord(_Record):
    """How the weights were fitted (empty for a variant that was not trained)."""

    epochs_run: int = 0
    best_epoch: int | None = None
    stopped_early: bool = False
    resumed_from_epoch: int = 0
    seconds: float | None = None
    device: str | None = None
    loss: str | None = None
    # one entry per epoch: epoch, train_loss, lr, val_* metrics, seconds
    history: list[dict[str, int | float]] = []
    tokens: TokenRecord | None = None  # language models only
    selection: SelectionRecord | None = None  # model.type: auto only
    epoch_choice: EpochChoiceRecord | None = None  # k-fold early stopping only

    @model_serializer(mode="wrap")
    def _tokens_when_any(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("tokens", "selection", "epoch_choice"):
            if getattr(self, key) is None:
                data.pop(key, None)
        return data


class DataRecord(_SparseRecord):
    """The training table: where it was (absolute, or a dataset id) and its fingerprint."""

    source: str | None = None
    fingerprint: str | None = None
    rows_read: int | None = None
    rows_dropped: int | None = None


class SplitRecord(_Record):
    """Rows in each split of the training table."""

    train: int
    val: int
    test: int


class ParentRecord(_SparseRecord):
    """The bundle a variant was derived from; ``model``/``version``/``id`` once the
    parent is a registered version."""

    name: str | None = None
    path: str | None = None
    weights_sha256: str | None = None
    runtime: Runtime | None = None
    model: str | None = None
    version: int | None = None
    id: int | str | None = None


class StepRecord(_SparseRecord):
    """The compression step that made a variant, with its settings as applied."""

    kind: Literal["distill", "prune", "quantize"]
    settings: JSONDocument = {}
    # pruning: what is left of the weights
    parameters: int | None = None
    nonzeros: int | None = None
    sparsity: float | None = None


class Lineage(_SparseRecord):
    """Where the bundle came from: the spec as written, the data, its parent."""

    # the training spec as a document: validating it would look at the filesystem
    # (image folders), and loading a bundle never does
    spec: JSONDocument | None = None
    data: DataRecord | None = None
    split: SplitRecord | None = None
    parent: ParentRecord | None = None
    step: StepRecord | None = None
    job: str | None = None
    project: str | None = None


class BundleMeta(BaseModel):
    """The contents of ``kiln.json``."""

    format: Literal["kiln.bundle"] = "kiln.bundle"
    format_version: int = FORMAT_VERSION
    name: str
    task: Literal["classification", "regression", "generation", "embedding"]
    created_at: str
    kiln_version: str
    model: ModelSpec
    input_schema: list[Column]
    target: str
    labels: list[JSONScalar] | None
    n_inputs: int = Field(ge=1)
    n_outputs: int = Field(ge=1)
    # what the architecture was built with besides its spec (vocab size, HF config)
    model_context: dict[str, Any] = {}
    runtime: Runtime = Runtime()
    parameters: int
    # per split ("test", "val"): the metrics kiln.evaluate computed
    metrics: dict[str, Metrics]
    training: TrainingRecord = TrainingRecord()
    lineage: Lineage = Lineage()
    files: dict[str, str] = {}
    # per input column, a summary of the training split (kiln.monitor.drift): what a
    # deployment compares live inputs with
    reference: dict[str, JsonValue] = {}


def parse_manifest(raw: Any, where: str) -> BundleMeta:
    """A manifest of any readable version as the current :class:`BundleMeta`.

    Raises BundleError (naming ``where``) for anything else.
    """
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{where} is not a kiln bundle manifest")
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"bundle format version {version} is not supported "
            f"(this kiln reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if version == 1:
        raw = _from_v1(raw)
    try:
        return BundleMeta.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        at = ".".join(str(p) for p in error["loc"])
        raise BundleError(f"{where} is invalid: {at}: {error['msg']}") from None


def _from_v1(raw: JSONDocument) -> JSONDocument:
    """Version 1 wrote the same sections untyped; only absent parents and the
    runtime's ``None``s need a shape."""
    out: JSONDocument = {**raw, "format_version": FORMAT_VERSION}
    lineage = out.get("lineage") or {}
    training = out.get("training") or {}
    if not isinstance(lineage, dict) or not isinstance(training, dict):
        return out  # not objects: validation names the section
    lineage = dict(lineage)
    if lineage.get("parent") is None:
        lineage.pop("parent", None)
    out["lineage"] = lineage
    out["training"] = {k: v for k, v in training.items() if v is not None}
    return out
