"""The compression steps for generation bundles: each turns a parent LM bundle into a variant.

- ``quantize`` on ``onnxruntime``: an onnxruntime-genai model built from the parent's
  weights (``kiln.runtime.genai.build_genai``): ``int4_weight`` (MatMulNBits 4-bit,
  backing off to 8-bit), or 8-bit for ``int8_dynamic`` -- *weight-only* int8 (recorded as
  ``int8_weight``), not dynamic activation quantization. Such a variant ships its
  ``genai/`` folder and no torch weights.
- ``quantize`` on ``torch`` with ``int8_dynamic``: the fp32 weights, every ``nn.Linear``
  quantized to dynamic int8 at load (as for classic torch int8 variants).
- ``distill``: a fresh, smaller student (``gpt`` or ``causal_lm``) on the teacher's
  tokenizer learns the teacher's next-token distributions over the labelled positions
  (:class:`TokenDistillLoss`) on the parent's training examples.

A step is tried as numbered attempts (1, 2, ...); :meth:`LMStep.tries` says how many there
are (only int4 has a milder one: int8). The tolerance loop is in
:mod:`kiln.compress.lm_pipeline`.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the conventional name

from kiln.bundle import WEIGHTS_FILE, new_meta
from kiln.compress.steps import StepKind
from kiln.data.dialogs import Example, LMFormat
from kiln.data.lm_encode import IGNORE, Encoded, encode_examples
from kiln.errors import SpecError
from kiln.lm_bundle import LMBundle
from kiln.manifest import JSONDocument, ParentRecord, Runtime, StepRecord, TrainingRecord
from kiln.models.causal_lm import CausalLM
from kiln.models.registry import build
from kiln.models.summary import count_parameters
from kiln.runtime.genai import GenaiPrecision, build_genai
from kiln.spec.compress import DistillStep, QuantizeStep
from kiln.spec.model import CausalLMSpec, GPTSpec, ModelSpec
from kiln.spec.train import TrainSpec
from kiln.train.lm_recipe import token_context
from kiln.train.loop import TensorData, fit_model


@dataclass(frozen=True)
class LMData:
    """The source's examples, split as they were for training (or ``data:``'s)."""

    format: LMFormat
    train: list[Example]
    val: list[Example]
    test: list[Example]
    loss_on: Literal["assistant", "all"] = "assistant"
    device: str = "auto"  # the source spec's train.device, for students

    @property
    def held_out(self) -> list[Example]:
        """Validation then test examples: what the tolerance is checked on."""
        return [*self.val, *self.test]


class LMStep(ABC):
    """One step of a compress spec for a generation bundle."""

    kind: ClassVar[StepKind]

    def __init__(self) -> None:
        self.scratch: list[Path] = []  # temporary folders; removed by cleanup()

    def tries(self) -> int:
        """How many attempts there are, mildest last (1: nothing to back off to)."""
        return 1

    @abstractmethod
    def apply(self, parent: LMBundle, data: LMData, attempt: int) -> LMBundle:
        """The variant attempt ``attempt`` (from 1) makes of ``parent`` (not saved)."""

    def describe(self, attempt: int) -> JSONDocument:
        """What attempt ``attempt`` tried, for the report."""
        return {}

    def cleanup(self) -> None:
        for folder in self.scratch:
            shutil.rmtree(folder, ignore_errors=True)
        self.scratch.clear()


class LMQuantize(LMStep):
    """onnxruntime-genai int4/int8 weight-only, or torch dynamic int8."""

    kind = "quantize"

    def __init__(self, spec: QuantizeStep) -> None:
        super().__init__()
        self.settings = spec.quantize

    def _precisions(self) -> list[GenaiPrecision]:
        if self.settings.backend == "torch":
            return []
        return ["int4", "int8"] if self.settings.method == "int4_weight" else ["int8"]

    def tries(self) -> int:
        return max(1, len(self._precisions()))

    def describe(self, attempt: int) -> JSONDocument:
        precisions = self._precisions()
        return {"precision": precisions[attempt - 1]} if precisions else {}

    def apply(self, parent: LMBundle, data: LMData, attempt: int) -> LMBundle:
        model = torch_weights(parent, "quantize")
        settings = self.settings
        if settings.method not in ("int8_dynamic", "int4_weight"):
            raise SpecError(
                f"generation bundles quantize with int8_dynamic or int4_weight, not "
                f"{settings.method}",
                field="steps.quantize.method",
            )
        record = settings.model_dump(mode="json")
        if settings.backend == "torch":
            from kiln.runtime.quantized import torch_int8

            torch_int8(model)  # fails early if this model cannot be quantized
            runtime = Runtime(backend="torch", quantization="int8_dynamic")
            step = StepRecord(kind="quantize", settings=record)
            return derive_lm(parent, copy.deepcopy(model), step=step, runtime=runtime)
        precision = self._precisions()[attempt - 1]
        folder = Path(tempfile.mkdtemp(prefix="kiln-genai-"))
        self.scratch.append(folder)
        write_hf_dir(parent, folder / "hf")
        build_genai(folder / "hf", folder / "genai", precision=precision)
        shutil.rmtree(folder / "hf")  # the fp32 copy is not needed any more
        quantization: Literal["int4_weight", "int8_weight"] = (
            "int4_weight" if precision == "int4" else "int8_weight"
        )
        return derive_lm(
            parent,
            None,
            step=StepRecord(kind="quantize", settings={**record, "precision": precision}),
            runtime=Runtime(backend="onnxruntime-genai", quantization=quantization),
            genai=folder / "genai",
        )


class LMDistill(LMStep):
    """Train a fresh student on the teacher's token distributions; no back-off."""

    kind = "distill"

    def __init__(self, spec: DistillStep) -> None:
        super().__init__()
        self.settings = spec.distill

    def apply(self, parent: LMBundle, data: LMData, attempt: int) -> LMBundle:
        teacher = torch_weights(parent, "distill from")
        s = self.settings
        tok = parent.tokenizer
        vocab = int(teacher.hf_config().get("vocab_size") or len(tok))  # type: ignore[arg-type]
        student_spec = _student_spec(s.student, parent, vocab)
        context: dict[str, Any] = dict(token_context(tok))
        torch.manual_seed(0)
        student = build(student_spec, vocab, vocab, **context)
        assert isinstance(student, CausalLM)
        _check_student_vocab(student, student_spec, tok, vocab)
        max_length = min(parent.max_length, student_spec.max_length)
        train = _encode(tok, data.train, data, max_length)
        y = np.stack([train.labels, train.input_ids, train.attention_mask], axis=1)  # (N, 3, L)
        tensors = TensorData(torch.from_numpy(train.tensor()), torch.from_numpy(y))
        if data.val:  # validation: the student's own token loss (labels (N, L))
            val = _encode(tok, data.val, data, max_length)
            tensors.x_val = torch.from_numpy(val.tensor())
            tensors.y_val = torch.from_numpy(val.labels)
        spec = TrainSpec(
            optimizer=s.optimizer,
            batch_size=s.batch_size,
            epochs=s.epochs,
            seed=0,
            device=data.device,
        )
        criterion = TokenDistillLoss(teacher, s.temperature, s.alpha)
        try:
            result = fit_model(
                student, tensors, spec, "generation", "token_cross_entropy", criterion=criterion
            )
        finally:
            teacher.cpu()
        student.cpu()
        context["hf_config"] = student.hf_config()
        return derive_lm(
            parent,
            student,
            model_spec=student_spec,
            context=context,
            step=StepRecord(kind="distill", settings=s.model_dump(mode="json")),
            training=TrainingRecord(
                epochs_run=result.epochs_run,
                history=result.history,
                seconds=round(result.seconds, 3),
                device=result.device,
                loss="token_distillation",
            ),
        )


class TokenDistillLoss(nn.Module):
    """``alpha * T² * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE``,
    both means over the labelled positions (logits at t predict the label at t + 1).

    Targets are (B, 3, L) [labels; ids; mask]: the teacher runs on the batch's tokens
    under no_grad, on the student's device. The teacher is held outside the module
    tree, so it is neither trained nor saved with the criterion."""

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float) -> None:
        super().__init__()
        self._teacher = (teacher.eval(),)
        self.t = temperature
        self.alpha = alpha

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        length = out.shape[1]  # inputs were trimmed to the batch's longest row
        labels, x = target[:, 0, :length], target[:, 1:, :length]  # (B, L), (B, 2, L)
        teacher = self._teacher[0]
        if next(teacher.parameters()).device != out.device:
            teacher.to(out.device)
        with torch.no_grad():
            teacher_logits = teacher(x).float()  # (B, L, V)
        keep = labels[:, 1:] != IGNORE  # (B, L - 1)
        if not bool(keep.any()):
            return out.sum() * 0.0  # no labelled token in this batch
        student = out[:, :-1][keep]  # (N, V)
        soft = F.kl_div(
            F.log_softmax(student / self.t, dim=-1),
            F.log_softmax(teacher_logits[:, :-1][keep] / self.t, dim=-1),
            log_target=True,
            reduction="batchmean",
        ) * (self.t**2)
        hard = F.cross_entropy(student, labels[:, 1:][keep])
        return self.alpha * soft + (1 - self.alpha) * hard


STEP_CLASSES: dict[type[Any], type[LMStep]] = {DistillStep: LMDistill, QuantizeStep: LMQuantize}


def lm_step_for(spec: object) -> LMStep:
    """The step object for a spec step; pruning has none for language models."""
    cls = STEP_CLASSES.get(type(spec))
    if cls is None:
        raise SpecError(
            "generation bundles compress with quantize: and distill: (not prune:)", field="steps"
        )
    return cls(spec)  # type: ignore[call-arg]


# ---- shared ------------------------------------------------------------------------


def torch_weights(parent: LMBundle, what: str) -> CausalLM:
    """The parent's fp32 causal LM: quantized variants are not compressed further."""
    if parent.meta.runtime.quantization or not isinstance(parent.model, CausalLM):
        raise SpecError(
            f"cannot {what} a quantized variant (it has no fp32 weights); put quantize last",
            field="steps",
        )
    return parent.model


def write_hf_dir(bundle: LMBundle, directory: Path) -> Path:
    """``bundle``'s model as a transformers directory (config.json, model.safetensors,
    tokenizer files): what onnxruntime-genai's builder reads."""
    model = torch_weights(bundle, "export")
    model.base_model().save_pretrained(str(directory))
    bundle.tokenizer.save_pretrained(str(directory))
    # A model imported from a GGUF keeps transformers' quantization_config (gguf), though
    # its weights are dequantized fp32 now; the builder would refuse them as GGUF.
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def _student_spec(student: ModelSpec, parent: LMBundle, vocab: int) -> GPTSpec | CausalLMSpec:
    if isinstance(student, GPTSpec):
        # a gpt student learns no BPE: it reads the teacher's vocabulary
        return student.model_copy(update={"vocab_size": vocab})
    if isinstance(student, CausalLMSpec):
        return student
    raise SpecError(
        f"a {student.type} student cannot learn from the causal LM {parent.name}; "
        "use type gpt or causal_lm",
        field="steps.distill.student.type",
    )


def _check_student_vocab(student: CausalLM, spec: ModelSpec, tokenizer: Any, vocab: int) -> None:
    """Distillation compares distributions token by token: same vocabulary, same ids."""
    width = int(student.base_model().get_output_embeddings().weight.shape[0])
    same = width == vocab
    if same and isinstance(spec, CausalLMSpec):
        from kiln.models.lm_source import load_lm_tokenizer, resolve_lm_source

        same = load_lm_tokenizer(resolve_lm_source(spec.path)).get_vocab() == tokenizer.get_vocab()
    if not same:
        raise SpecError(
            "the student's vocabulary is not the teacher's tokenizer's; distillation needs "
            "the same tokens",
            field="steps.distill.student",
        )


def _encode(tok: Any, examples: list[Example], data: LMData, max_length: int) -> Encoded:
    return encode_examples(
        tok, examples, data.format, max_length=max_length, loss_on=data.loss_on, packing=False
    )


def derive_lm(
    parent: LMBundle,
    model: CausalLM | None,
    *,
    step: StepRecord,
    model_spec: ModelSpec | None = None,
    context: Mapping[str, object] | None = None,
    runtime: Runtime | None = None,
    genai: Path | None = None,
    training: TrainingRecord | None = None,
) -> LMBundle:
    """A variant of ``parent``: same tokenizer, generation defaults and lineage, a new
    model (or a genai folder alone); its lineage names ``parent`` and the step."""
    meta = parent.meta
    parent_record = ParentRecord(
        name=meta.name,
        path=str(parent.path) if parent.path else None,
        weights_sha256=meta.files.get(WEIGHTS_FILE),
        runtime=meta.runtime.model_copy(),
    )
    lineage = meta.lineage.model_copy(deep=True, update={"parent": parent_record, "step": step})
    new = new_meta(
        name=meta.name,
        task="generation",
        model=model_spec or meta.model,
        input_schema=meta.input_schema,
        target=meta.target,
        labels=meta.labels,
        n_inputs=meta.n_inputs,
        n_outputs=meta.n_outputs,
        model_context=dict(context if context is not None else meta.model_context),
        parameters=count_parameters(model) if model is not None else meta.parameters,
        metrics={},
        training=training or TrainingRecord(),
        lineage=lineage,
        runtime=runtime or Runtime(),
    )
    return LMBundle(new, model, parent.tokenizer, parent.generation.model_copy(), genai=genai)
