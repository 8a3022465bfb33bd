"""``kiln compress``: run a chain of steps, each checked against the accuracy tolerance.

Every step turns its parent bundle into a variant bundle (lineage: the parent, the
step, its settings). After each step the variant is scored on the validation split; if
the metric dropped (versus the *source*) by more than ``tolerance.max_drop`` the step
backs off and retries, up to ``tolerance.retries`` times: pruning halves its amount,
onnxruntime quantization leaves the most sensitive layers in fp32, one more each try.
Distillation has nothing to back off to. A step that cannot fit raises ToleranceError;
the variants before it are already saved, so the last one that fit is kept.

Data: the source bundle's own training table and split, re-read from its lineage and
verified against its fingerprint (or a labelled table given as ``data``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError

from kiln.bundle import Bundle, new_meta
from kiln.compress import measure
from kiln.compress.distill import check_student, distill
from kiln.compress.prune import sparsity, structured, unstructured_masks
from kiln.compress.quantize import ort_int8, sensitivity, torch_int8
from kiln.data.split import holdout
from kiln.errors import BundleError, DataError, SpecError, ToleranceError
from kiln.evaluate.metrics import headline_metric
from kiln.manifest import DataRecord
from kiln.models.summary import count_parameters
from kiln.runtime.onnx import check_parity, export_onnx
from kiln.spec.compress import CompressSpec, DistillStep, PruneStep, QuantizeStep
from kiln.spec.load import load_document
from kiln.spec.model import ModelSpec
from kiln.spec.spec import Spec, metric_mode
from kiln.spec.train import TrainSpec
from kiln.train.loop import TensorData, fit_model
from kiln.train.recipe import load_table

# Rows used to rank layers by quantization sensitivity.
SENSITIVITY_ROWS = 256

Events = Callable[[str], None]


@dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    device: str = "auto"  # the source spec's train.device, for students and fine-tuning


@dataclass
class Variant:
    name: str
    bundle: Bundle
    path: Path | None
    report: dict[str, Any]


@dataclass
class CompressResult:
    source: Variant
    variants: list[Variant] = field(default_factory=list)
    metric: str = "accuracy"


def load_compress_spec(source: str | Path | dict[str, Any] | CompressSpec) -> CompressSpec:
    """Validate a compress spec from a YAML/JSON file, a mapping, or itself."""
    return load_document(CompressSpec, source)


def compress(
    spec: str | Path | dict[str, Any] | CompressSpec,
    out: str | Path,
    *,
    on_event: Events | None = None,
    measure_runs: int = 50,
    data_root: Path | None = None,
) -> CompressResult:
    """Run ``spec``'s steps from its source bundle; variants are saved under ``out``.

    ``data_root`` (a server's dataset folder) confines image paths to it.
    """
    spec = load_compress_spec(spec)
    say = on_event or (lambda _msg: None)
    out = Path(out)
    source = Bundle.load(spec.source)
    splits = _splits(source, spec.data, data_root)
    metric = spec.tolerance.metric if spec.tolerance else headline_metric(source.meta.task)
    _check_metric(metric, source)
    base_val = source.evaluate(splits.val)[metric]
    say(f"source {source.name}: val {metric} {base_val:.4f}")
    result = CompressResult(source=Variant("source", source, source.path, {}), metric=metric)
    source_test = source.evaluate(splits.test)[metric]
    result.source.report = _report(
        source, source, splits, metric, base_val, source_test, {}, measure_runs, source.path
    )
    try:
        _run_steps(
            spec, out, source, splits, metric, base_val, source_test, result, say, measure_runs
        )
    except ToleranceError as exc:
        exc.partial = result  # type: ignore[attr-defined]  # what fitted, for the report
        raise
    return result


def _run_steps(
    spec: CompressSpec,
    out: Path,
    source: Bundle,
    splits: Splits,
    metric: str,
    base_val: float,
    source_test: float,
    result: CompressResult,
    say: Events,
    measure_runs: int,
) -> None:
    parent = source
    for i, step in enumerate(spec.steps, start=1):
        kind = _kind(step)
        name = f"{i:02d}-{kind}"
        variant, info = _fit_step(step, parent, source, splits, spec, metric, base_val, say)
        directory = out / name
        variant.save(directory)
        report = _report(
            variant, parent, splits, metric, base_val, source_test, info, measure_runs, directory
        )
        variant.report = report
        variant.save(directory)
        result.variants.append(Variant(name, variant, directory, report))
        say(f"{name}: saved {directory}")
        parent = variant


# ---- data ------------------------------------------------------------------------


def _splits(source: Bundle, override: str | None, data_root: Path | None = None) -> Splits:
    lineage = source.meta.lineage
    if lineage.spec is None:
        raise DataError("the source bundle records no training spec; give data:", field="data")
    try:
        spec = Spec.model_validate(lineage.spec)
    except ValidationError:
        raise BundleError("the source bundle's lineage spec is invalid", field="source") from None
    # The lineage records where the data was, made absolute at training time.
    recorded = lineage.data or DataRecord()
    data_source = override if override is not None else recorded.source
    if data_source:
        spec = spec.model_copy(
            update={"data": spec.data.model_copy(update={"source": data_source})}
        )
    table = load_table(spec, data_root=data_root)
    if override is None and table.fingerprint != recorded.fingerprint:
        raise DataError(
            f"the source's training data {spec.data.source} changed since it was trained "
            "(fingerprint mismatch); give the labelled data to use as data:",
            field="data",
        )
    stratify = spec.task == "classification" and spec.data.split.stratify
    parts = holdout(table.frame[spec.data.target], spec.data.split, stratify)
    if len(parts.val) == 0:
        raise DataError(
            "the source has no validation data (its spec has data.split.val: 0); "
            "compression needs it to check the tolerance",
            field="data",
        )
    frame = table.frame
    test = frame.iloc[parts.test] if len(parts.test) else frame.iloc[parts.val]
    return Splits(frame.iloc[parts.train], frame.iloc[parts.val], test, spec.train.device)


def _encode(bundle: Bundle, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    pre = bundle.preprocessor
    return pre.transform(frame), pre.transform_target(frame[bundle.meta.target])


# ---- steps -----------------------------------------------------------------------


def _kind(step: Any) -> str:
    if isinstance(step, DistillStep):
        return "distill"
    return "prune" if isinstance(step, PruneStep) else "quantize"


def _fit_step(
    step: Any,
    parent: Bundle,
    source: Bundle,
    splits: Splits,
    spec: CompressSpec,
    metric: str,
    base: float,
    say: Events,
) -> tuple[Bundle, dict[str, Any]]:
    """Apply ``step`` with back-off until the variant is within tolerance."""
    retries = spec.tolerance.retries if spec.tolerance else 0
    attempts: list[dict[str, Any]] = []
    sens: list[str] | None = None
    amount = step.prune.amount if isinstance(step, PruneStep) else None
    for attempt in range(retries + 1):
        excluded: list[str] = []
        if isinstance(step, DistillStep):
            variant = _distill(step, parent, splits)
        elif isinstance(step, PruneStep):
            assert amount is not None
            variant = _prune(step, parent, splits, amount)
        else:
            if attempt and step.quantize.backend == "onnxruntime":
                if sens is None:
                    sens = _sensitive_layers(parent, splits)
                excluded = sens[:attempt]
            variant = _quantize(step, parent, splits, excluded)
        value = variant.evaluate(splits.val)[metric]
        drop = _drop(metric, base, value)
        tried = {"attempt": attempt + 1, f"val_{metric}": value, "drop": drop}
        if amount is not None:
            tried["amount"] = amount
        if excluded:
            tried["excluded"] = excluded
        attempts.append(tried)
        say(f"{_kind(step)} attempt {attempt + 1}: val {metric} {value:.4f} (drop {drop:+.4f})")
        if spec.tolerance is None or drop <= spec.tolerance.max_drop:
            return variant, {"attempts": attempts, "excluded": excluded, "amount": amount}
        if isinstance(step, DistillStep):
            break  # nothing to back off to
        if amount is not None:
            amount = amount / 2
    assert spec.tolerance is not None
    raise ToleranceError(
        f"{_kind(step)} could not keep val {metric} within {spec.tolerance.max_drop} of the "
        f"source ({base:.4f}) after {len(attempts)} attempt(s): "
        + ", ".join(f"{a[f'val_{metric}']:.4f}" for a in attempts)
        + "; the variants before this step are kept",
        field="tolerance.max_drop",
    )


def _distill(step: DistillStep, parent: Bundle, splits: Splits) -> Bundle:
    settings = step.distill
    text = parent.preprocessor.state.text
    check_student(
        settings,
        parent.preprocessor.kind,
        parent.meta.model.type,
        text.max_length if text is not None else 0,
    )
    x, y = _encode(parent, splits.train)
    teacher_out = parent.backend.forward(x)
    val = _encode(parent, splits.val)
    scale = getattr(parent.preprocessor.state.target, "scale", 1.0)
    student, result = distill(
        settings,
        parent.meta.task,
        parent.meta.n_inputs,
        parent.meta.n_outputs,
        parent.meta.model_context,
        x,
        y,
        teacher_out,
        val,
        seed=0,
        target_scale=scale,
        device=splits.device,
    )
    context = {k: v for k, v in parent.meta.model_context.items() if k != "hf_config"}
    return _derive(
        parent,
        student,
        settings.student,
        context=context,
        step={"kind": "distill", "settings": step.distill.model_dump(mode="json")},
        training={"epochs_run": result.epochs_run, "history": result.history},
    )


def _prune(step: PruneStep, parent: Bundle, splits: Splits, amount: float) -> Bundle:
    settings = step.prune
    _require_fp32_torch(parent, "prune")
    model_spec = parent.meta.model
    model = copy.deepcopy(parent.model).cpu()
    masked: list[Any] = []
    if settings.method == "structured":
        model, model_spec = structured(model, model_spec, amount, parent.example_input())
    else:
        masked = unstructured_masks(model, amount, settings.method)
    epochs = 0
    if settings.finetune_epochs:
        x, y = _encode(parent, splits.train)
        xv, yv = _encode(parent, splits.val)
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
        result = fit_model(
            model,
            TensorData(
                torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xv), torch.from_numpy(yv)
            ),
            train,
            parent.meta.task,
            loss,
            target_scale=getattr(parent.preprocessor.state.target, "scale", 1.0),
        )
        epochs = result.epochs_run
    for module in masked:  # fold masks into the weights once fine-tuning is done
        torch.nn.utils.prune.remove(module, "weight")
    return _derive(
        parent,
        model,
        model_spec,
        context=parent.meta.model_context,
        step={
            "kind": "prune",
            "settings": {**settings.model_dump(mode="json"), "amount": amount},
            **sparsity(model),
        },
        training={"epochs_run": epochs},
    )


def _quantize(step: QuantizeStep, parent: Bundle, splits: Splits, excluded: list[str]) -> Bundle:
    settings = step.quantize
    _require_fp32_torch(parent, "quantize")
    model = copy.deepcopy(parent.model).cpu().eval()
    onnx = None
    runtime: dict[str, Any]
    if settings.method in ("fp16", "bf16"):
        if not torch.cuda.is_available():
            raise SpecError(
                f"{settings.method} quantization targets GPUs and needs a CUDA device; "
                "on CPU use method: int8_dynamic",
                field="steps.quantize.method",
            )
        runtime = {"backend": "torch", "quantization": settings.method}
    elif settings.backend == "onnxruntime":
        sample = _encode(parent, splits.val.iloc[:SENSITIVITY_ROWS])[0]
        fp32 = export_onnx(model, parent.example_input())
        check_parity(model, fp32, sample)
        onnx = ort_int8(fp32, exclude=excluded)
        runtime = {"backend": "onnxruntime", "quantization": "int8_dynamic", "excluded": excluded}
    else:
        torch_int8(model)  # fails early if this model cannot be quantized
        runtime = {"backend": "torch", "quantization": "int8_dynamic"}
    return _derive(
        parent,
        model,
        parent.meta.model,
        context=parent.meta.model_context,
        step={"kind": "quantize", "settings": settings.model_dump(mode="json")},
        runtime=runtime,
        onnx=onnx,
    )


def _sensitive_layers(parent: Bundle, splits: Splits) -> list[str]:
    sample = _encode(parent, splits.val.iloc[:SENSITIVITY_ROWS])[0]
    fp32 = export_onnx(copy.deepcopy(parent.model).cpu().eval(), parent.example_input())
    return [name for name, _ in sensitivity(fp32, sample)]


def _require_fp32_torch(parent: Bundle, what: str) -> None:
    if parent.meta.runtime.quantization:
        raise SpecError(
            f"cannot {what} an already quantized variant; put quantize last",
            field="steps",
        )


def _derive(
    parent: Bundle,
    model: torch.nn.Module,
    model_spec: ModelSpec,
    *,
    context: dict[str, Any],
    step: dict[str, Any],
    training: dict[str, Any] | None = None,
    runtime: dict[str, Any] | None = None,
    onnx: bytes | None = None,
) -> Bundle:
    """A variant bundle of ``parent``: same data, preprocessing and lineage, new model."""
    meta = parent.meta
    lineage = {
        **meta.lineage.model_dump(mode="json", exclude_none=True),
        "parent": {
            "name": meta.name,
            "path": str(parent.path) if parent.path else None,
            "weights_sha256": meta.files.get("weights.safetensors"),
            "runtime": meta.runtime.model_dump(mode="json"),
        },
        "step": step,
    }
    new = new_meta(
        name=meta.name,
        task=meta.task,
        model=model_spec,
        input_schema=meta.input_schema,
        reference=meta.reference,  # same inputs, same training data
        target=meta.target,
        labels=meta.labels,
        n_inputs=meta.n_inputs,
        n_outputs=meta.n_outputs,
        model_context=context,
        parameters=count_parameters(model),
        metrics={},
        training={"loss": meta.training.loss, **(training or {})},
        lineage=lineage,
        runtime=runtime or {"backend": "torch", "quantization": None},
    )
    return Bundle(new, model.cpu().eval(), parent.preprocessor, onnx=onnx)


# ---- scoring and reports ---------------------------------------------------------


def _check_metric(metric: str, bundle: Bundle) -> None:
    from kiln.evaluate.metrics import SCALAR_CLASSIFICATION, SCALAR_REGRESSION

    allowed = SCALAR_CLASSIFICATION if bundle.meta.task == "classification" else SCALAR_REGRESSION
    if metric not in allowed:
        raise SpecError(
            f"tolerance.metric {metric!r} is not one of {list(allowed)}", field="tolerance.metric"
        )


def _drop(metric: str, base: float, value: float) -> float:
    """How much worse ``value`` is than ``base`` (positive = worse)."""
    return base - value if metric_mode(metric) == "max" else value - base


def _report(
    variant: Bundle,
    parent: Bundle,
    splits: Splits,
    metric: str,
    base_val: float,
    source_test: float,
    info: dict[str, Any],
    runs: int,
    directory: Path | None = None,
) -> dict[str, Any]:
    test = variant.evaluate(splits.test)
    variant.meta.metrics = {"test": test, "val": variant.evaluate(splits.val)}
    agreement = _agreement(variant, parent, splits.test)
    sample = variant.preprocessor.transform(splits.test.iloc[:32])
    weights = variant.onnx if variant.meta.runtime.backend == "onnxruntime" else None
    model_bytes = (
        len(weights)
        if weights is not None
        else sum(t.numel() * t.element_size() for t in variant.model.state_dict().values())
    )
    report: dict[str, Any] = {
        "name": variant.name,
        "step": step.model_dump(mode="json") if (step := variant.meta.lineage.step) else None,
        "attempts": info.get("attempts", []),
        "backend": variant.meta.runtime.backend,
        "quantization": variant.meta.runtime.quantization,
        "excluded_layers": info.get("excluded", []),
        "model_bytes": model_bytes,
        "disk_bytes": measure.disk_bytes(directory) if directory is not None else None,
        **sparsity(variant.model),
        "latency": measure.latency(variant, sample, runs=runs),
        "peak_memory_bytes": measure.peak_memory(directory) if directory is not None else None,
        "metric": {
            "name": metric,
            "test": test[metric],
            "source_test": source_test,
            "val": variant.meta.metrics["val"][metric],
            "source_val": base_val,
            "drop": _drop(metric, base_val, variant.meta.metrics["val"][metric]),
        },
        "agreement_with_parent": agreement,
        "machine": measure.machine(),
    }
    drop = report["metric"]["drop"]
    report["metric"]["relative_drop"] = drop / abs(base_val) if base_val else None
    return report


def _agreement(variant: Bundle, parent: Bundle, frame: pd.DataFrame) -> float:
    """Classification: share of rows with the same predicted label as the parent;
    regression: R² of the variant's predictions against the parent's."""
    a = variant.predict(frame).predictions
    b = parent.predict(frame).predictions
    if variant.meta.task == "classification":
        return float(np.mean([x == y for x, y in zip(a, b, strict=True)]))
    from sklearn.metrics import r2_score

    return float(r2_score(np.asarray(b), np.asarray(a)))
