"""The compression steps: one class per kind, each turning a parent bundle into a variant.

A step is tried as a sequence of :class:`Attempt` s: :meth:`CompressStep.first` is the
step as written, :meth:`CompressStep.apply` makes the variant for one attempt, and
:meth:`CompressStep.back_off` gives the next, milder attempt (or None when there is
nothing milder): pruning halves its amount, onnxruntime int8 leaves the next most
sensitive layer in fp32, distillation and torch quantization have nothing to back off to.
The tolerance loop that scores attempts lives in :mod:`kiln.compress.pipeline`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import pandas as pd
import torch

from kiln.bundle import Bundle, new_meta
from kiln.compress.distill import check_student, distill, native_inputs, student_preprocessor
from kiln.compress.prune import sparsity, structured, unstructured_masks
from kiln.compress.quantize import ort_int8, sensitivity
from kiln.data.preprocess import Preprocessor
from kiln.errors import SpecError
from kiln.manifest import ParentRecord, Runtime, StepRecord, TrainingRecord
from kiln.models.summary import count_parameters
from kiln.runtime.onnx import check_parity, export_onnx
from kiln.runtime.placement import require_cuda_for
from kiln.runtime.quantized import torch_int8
from kiln.spec.compress import DistillStep, PruneStep, QuantizeStep
from kiln.spec.model import TREE_MODELS, ModelSpec
from kiln.spec.train import TrainSpec
from kiln.train.loop import TensorData, fit_model

# Rows used to rank layers by quantization sensitivity.
SENSITIVITY_ROWS = 256

StepKind = Literal["distill", "prune", "quantize"]
S = TypeVar("S", DistillStep, PruneStep, QuantizeStep)


@dataclass
class Splits:
    """The source's training table, split as it was for training; ``held_out`` is the
    validation and test rows together (the tolerance is checked on those)."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    held_out: pd.DataFrame
    device: str = "auto"  # the source spec's train.device, for students and fine-tuning


@dataclass(frozen=True)
class Attempt:
    """One try of a step: its number (from 1) and the setting it backs off."""

    number: int = 1
    amount: float | None = None  # pruning: the share of weights removed
    excluded: tuple[str, ...] = ()  # onnxruntime int8: graph nodes left in fp32


class CompressStep(ABC, Generic[S]):
    """A step of a compress spec; ``kind`` names it (and its variant's folder)."""

    kind: ClassVar[StepKind]

    def __init__(self, spec: S) -> None:
        self.spec: S = spec

    def first(self) -> Attempt:
        """The step as the spec wrote it."""
        return Attempt()

    @abstractmethod
    def apply(self, parent: Bundle, splits: Splits, attempt: Attempt) -> Bundle:
        """The variant of ``parent`` this attempt makes (not saved)."""

    def back_off(self, parent: Bundle, splits: Splits, attempt: Attempt) -> Attempt | None:
        """The next, milder attempt after ``attempt``; None when there is none."""
        return None


class Distill(CompressStep[DistillStep]):
    """Train a fresh student on the parent's outputs; nothing to back off to."""

    kind = "distill"

    def apply(self, parent: Bundle, splits: Splits, attempt: Attempt) -> Bundle:
        settings = self.spec.distill
        text = parent.preprocessor.state.text
        check_student(
            settings,
            parent.preprocessor.kind,
            parent.meta.model.type,
            text.max_length if text is not None else 0,
        )
        if settings.student.type in TREE_MODELS:
            raise SpecError(
                "a gbdt student is boosted, not distilled: train it on the data itself",
                field="steps.distill.student.type",
            )
        x, y = encode(parent, splits.train)
        teacher_out = parent.backend.forward(x)
        # a native-input teacher (gbdt: NaN, category codes): the student fits its own
        # imputing, scaling, one-hot preprocessing on the same training rows
        pre = parent.preprocessor
        context = {k: v for k, v in parent.meta.model_context.items() if k != "hf_config"}
        if native_inputs(pre):
            pre = student_preprocessor(pre, parent.meta.lineage.spec, splits.train)
            x, context = pre.transform(splits.train), {}
        target = parent.meta.target
        student, result = distill(
            settings,
            parent.meta.task,
            pre.n_outputs,
            parent.meta.n_outputs,
            context,
            x,
            y,
            teacher_out,
            (pre.transform(splits.val), pre.transform_target(splits.val[target])),
            seed=0,
            target_scale=_target_scale(parent),
            device=splits.device,
        )
        return derive(
            parent,
            student,
            settings.student,
            context=context,
            step=StepRecord(kind="distill", settings=settings.model_dump(mode="json")),
            training=TrainingRecord(epochs_run=result.epochs_run, history=result.history),
            preprocessor=pre,
        )


class Prune(CompressStep[PruneStep]):
    """Magnitude pruning, then optional fine-tuning; backs off by halving the amount."""

    kind = "prune"

    def first(self) -> Attempt:
        return Attempt(amount=self.spec.prune.amount)

    def back_off(self, parent: Bundle, splits: Splits, attempt: Attempt) -> Attempt | None:
        assert attempt.amount is not None
        return replace(attempt, number=attempt.number + 1, amount=attempt.amount / 2)

    def apply(self, parent: Bundle, splits: Splits, attempt: Attempt) -> Bundle:
        settings = self.spec.prune
        amount = attempt.amount
        assert amount is not None
        refuse_trees(
            parent,
            "prune",
            "a gbdt model has no weights to prune; train fewer or smaller trees instead "
            "(model.n_estimators, model.num_leaves)",
        )
        require_fp32(parent, "prune")
        model_spec = parent.meta.model
        model = copy.deepcopy(parent.model).cpu()
        masked: list[torch.nn.Module] = []
        if settings.method == "structured":
            model, model_spec = structured(model, model_spec, amount, parent.example_input())
        else:
            masked = unstructured_masks(model, amount, settings.method)
        epochs = self._finetune(model, parent, splits) if settings.finetune_epochs else 0
        for module in masked:  # fold masks into the weights once fine-tuning is done
            torch.nn.utils.prune.remove(module, "weight")
        left = sparsity(model)
        return derive(
            parent,
            model,
            model_spec,
            context=parent.meta.model_context,
            step=StepRecord(
                kind="prune",
                settings={**settings.model_dump(mode="json"), "amount": amount},
                parameters=left.parameters,
                nonzeros=left.nonzeros,
                sparsity=left.sparsity,
            ),
            training=TrainingRecord(epochs_run=epochs),
        )

    def _finetune(self, model: torch.nn.Module, parent: Bundle, splits: Splits) -> int:
        """Train the pruned ``model`` in place (masks held); returns the epochs run."""
        settings = self.spec.prune
        x, y = encode(parent, splits.train)
        xv, yv = encode(parent, splits.val)
        train = TrainSpec.model_validate(
            {
                "optimizer": {"name": "adam", "lr": settings.lr},
                "epochs": settings.finetune_epochs,
                "batch_size": 32,
                "device": splits.device,
            }
        )
        loss = parent.meta.training.loss or (
            "cross_entropy" if parent.meta.task == "classification" else "mse"
        )
        data = TensorData(*(torch.from_numpy(a) for a in (x, y, xv, yv)))
        result = fit_model(
            model, data, train, parent.meta.task, loss, target_scale=_target_scale(parent)
        )
        return result.epochs_run


class Quantize(CompressStep[QuantizeStep]):
    """int8 dynamic (onnxruntime or torch) or a half-precision cast for GPUs.

    onnxruntime int8 backs off by leaving one more layer in fp32, most sensitive first
    (ranked once per step, on the parent's validation rows).
    """

    kind = "quantize"

    def __init__(self, spec: QuantizeStep) -> None:
        super().__init__(spec)
        self._ranking: list[str] | None = None

    def back_off(self, parent: Bundle, splits: Splits, attempt: Attempt) -> Attempt | None:
        settings = self.spec.quantize
        if settings.backend != "onnxruntime" or settings.method != "int8_dynamic":
            return None
        if self._ranking is None:
            self._ranking = sensitive_layers(parent, splits)
        if len(attempt.excluded) >= len(self._ranking):
            return None  # every layer is already in fp32
        excluded = tuple(self._ranking[: attempt.number])
        return Attempt(number=attempt.number + 1, excluded=excluded)

    def apply(self, parent: Bundle, splits: Splits, attempt: Attempt) -> Bundle:
        settings = self.spec.quantize
        if settings.method == "int4_weight":
            raise SpecError(
                "steps.quantize.method: int4_weight is for generation bundles "
                "(onnxruntime-genai); use int8_dynamic here",
                field="steps.quantize.method",
            )
        refuse_trees(
            parent,
            "quantize",
            "a gbdt model has no weight matrices to quantize (onnxruntime int8 leaves a "
            "tree ensemble as it is; torch and half precision do not run trees); for an "
            "onnxruntime copy of the trees use `kiln export`",
        )
        require_fp32(parent, "quantize")
        model = copy.deepcopy(parent.model).cpu().eval()
        onnx = None
        if settings.method in ("fp16", "bf16"):
            require_cuda_for(settings.method, "steps.quantize.method")
            runtime = Runtime(backend="torch", quantization=settings.method)
        elif settings.backend == "onnxruntime":
            sample = encode(parent, splits.val.iloc[:SENSITIVITY_ROWS])[0]
            fp32 = export_onnx(model, parent.example_input())
            check_parity(model, fp32, sample)
            excluded = list(attempt.excluded)
            onnx = ort_int8(fp32, exclude=excluded)
            runtime = Runtime(backend="onnxruntime", quantization="int8_dynamic", excluded=excluded)
        else:
            torch_int8(model)  # fails early if this model cannot be quantized
            runtime = Runtime(backend="torch", quantization="int8_dynamic")
        return derive(
            parent,
            model,
            parent.meta.model,
            context=parent.meta.model_context,
            step=StepRecord(kind="quantize", settings=settings.model_dump(mode="json")),
            runtime=runtime,
            onnx=onnx,
        )


STEP_CLASSES: dict[type[Any], type[CompressStep[Any]]] = {
    DistillStep: Distill,
    PruneStep: Prune,
    QuantizeStep: Quantize,
}
"""The step class for each kind of spec step."""


def step_for(spec: DistillStep | PruneStep | QuantizeStep) -> CompressStep[Any]:
    """The step object that runs ``spec`` (one per spec step: it keeps its ranking)."""
    return STEP_CLASSES[type(spec)](spec)


# ---- shared by the steps -------------------------------------------------------------


def encode(bundle: Bundle, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``frame``'s inputs and targets through ``bundle``'s fitted preprocessing."""
    pre = bundle.preprocessor
    return pre.transform(frame), pre.transform_target(frame[bundle.meta.target])


def sensitive_layers(parent: Bundle, splits: Splits) -> list[str]:
    """``parent``'s quantizable graph nodes, most sensitive to int8 first."""
    sample = encode(parent, splits.val.iloc[:SENSITIVITY_ROWS])[0]
    fp32 = export_onnx(copy.deepcopy(parent.model).cpu().eval(), parent.example_input())
    return [name for name, _ in sensitivity(fp32, sample)]


def refuse_trees(parent: Bundle, kind: str, why: str) -> None:
    """A step on weights: SpecError naming ``steps.<kind>`` for a gbdt parent."""
    if parent.meta.model.type in TREE_MODELS:
        raise SpecError(f"steps.{kind}: {why}", field=f"steps.{kind}")


def require_fp32(parent: Bundle, what: str) -> None:
    """Pruning and quantizing start from full-precision weights."""
    if parent.meta.runtime.quantization:
        raise SpecError(
            f"cannot {what} an already quantized variant; put quantize last",
            field="steps",
        )


def _target_scale(bundle: Bundle) -> float:
    return float(getattr(bundle.preprocessor.state.target, "scale", 1.0))


def derive(
    parent: Bundle,
    model: torch.nn.Module,
    model_spec: ModelSpec,
    *,
    context: Mapping[str, object],
    step: StepRecord,
    training: TrainingRecord | None = None,
    runtime: Runtime | None = None,
    onnx: bytes | None = None,
    preprocessor: Preprocessor | None = None,
) -> Bundle:
    """A variant bundle of ``parent``: same data, preprocessing and lineage, new model;
    its lineage names ``parent`` and the ``step`` that made it. ``preprocessor``: the
    variant's own (a student of a native-input teacher), in place of the parent's."""
    meta = parent.meta
    pre = preprocessor or parent.preprocessor
    parent_record = ParentRecord(
        name=meta.name,
        path=str(parent.path) if parent.path else None,
        weights_sha256=meta.files.get("weights.safetensors"),
        runtime=meta.runtime.model_copy(),
    )
    lineage = meta.lineage.model_copy(deep=True, update={"parent": parent_record, "step": step})
    record = (training or TrainingRecord()).model_copy(update={"loss": meta.training.loss})
    new = new_meta(
        name=meta.name,
        task=meta.task,
        model=model_spec,
        input_schema=meta.input_schema,
        reference=meta.reference,  # same inputs, same training data
        target=meta.target,
        labels=meta.labels,
        n_inputs=meta.n_inputs if preprocessor is None else pre.n_outputs,
        n_outputs=meta.n_outputs,
        model_context=dict(context),
        parameters=count_parameters(model),
        metrics={},
        training=record,
        lineage=lineage,
        runtime=runtime or Runtime(),
    )
    return Bundle(new, model.cpu().eval(), pre, onnx=onnx)
