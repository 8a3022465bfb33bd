"""``kiln compress``: run a chain of steps, each checked against the accuracy tolerance.

Every step turns its parent bundle into a variant bundle (lineage: the parent, the
step, its settings). After each step the variant is scored on the held-out rows (the
validation and test splits together: a 16-row validation split alone let a variant
lose 9 points of test accuracy); if the metric dropped (versus the *source*, on the
same rows) by more than ``tolerance.max_drop`` the
step backs off and retries, up to ``tolerance.retries`` times: pruning halves its
amount, onnxruntime quantization leaves the most sensitive layers in fp32, one more
each try. Distillation has nothing to back off to. A step that cannot fit raises
:class:`CompressToleranceError`; the variants before it are already saved, so the last
one that fit is kept. Each variant's report records every attempt of its step, and
the 95% intervals of its held-out metric and drop (:mod:`kiln.compress.confidence`).
Fewer held-out rows than ``tolerance.min_rows`` is refused before any step runs.

Data: the source bundle's own training table and split, re-read from its lineage and
verified against its fingerprint (or a labelled table given as ``data``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from kiln.bundle import Bundle
from kiln.compress import measure
from kiln.compress.confidence import RowScores, drop_interval, metric_interval, row_scores
from kiln.compress.prune import sparsity
from kiln.compress.report import HeldOutReport, Interval, MetricReport, VariantReport
from kiln.compress.steps import Attempt, CompressStep, Splits, step_for
from kiln.data.split import holdout
from kiln.errors import BundleError, DataError, SpecError, ToleranceError
from kiln.evaluate.metrics import headline_metric, metric_value
from kiln.manifest import DataRecord, JSONDocument
from kiln.spec.compress import CompressSpec
from kiln.spec.load import load_document
from kiln.spec.spec import Spec, metric_mode
from kiln.train.recipe import load_table

if TYPE_CHECKING:
    from kiln.lm_bundle import LMBundle

Events = Callable[[str], None]
SpecDocument = str | Path | dict[str, Any] | CompressSpec
"""A compress spec: a YAML/JSON file, a mapping, or the validated spec."""


@dataclass
class Variant:
    name: str
    bundle: Bundle | LMBundle  # an LMBundle for a generation source
    path: Path | None
    report: JSONDocument  # compression.json: a VariantReport as JSON


@dataclass
class CompressResult:
    source: Variant
    variants: list[Variant] = field(default_factory=list)
    metric: str = "accuracy"


@dataclass(frozen=True)
class Judgement:
    """A bundle's tolerance metric on the held-out rows, against the source's."""

    value: float
    drop: float  # versus the source on the same rows; positive = worse
    interval: Interval  # of value
    drop_interval: Interval  # of drop (paired: same rows)
    val: float  # on the validation split alone


@dataclass(frozen=True)
class AttemptRecord:
    """One scored try of a step: what it tried and how it scored on the held-out rows."""

    attempt: Attempt
    judgement: Judgement

    @property
    def value(self) -> float:
        return self.judgement.value

    @property
    def drop(self) -> float:
        return self.judgement.drop

    def to_json(self, metric: str) -> JSONDocument:
        """The report's shape: attempt, val_<metric>, drop (the one checked, on the held-out
        rows), held_out_<metric> and the drop's interval, then amount / excluded."""
        j = self.judgement
        out: JSONDocument = {
            "attempt": self.attempt.number,
            f"val_{metric}": j.val,
            "drop": j.drop,
            f"held_out_{metric}": j.value,
            "drop_interval": j.drop_interval.model_dump(mode="json"),
        }
        if self.attempt.amount is not None:
            out["amount"] = self.attempt.amount
        if self.attempt.excluded:
            out["excluded"] = list(self.attempt.excluded)
        return out


class CompressToleranceError(ToleranceError):
    """A step that no attempt could fit within the tolerance.

    ``partial`` is the run up to the step before it (its variants are saved);
    ``attempts`` are the failing step's tries, in order.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str,
        partial: CompressResult,
        attempts: list[AttemptRecord],
    ) -> None:
        super().__init__(message, field=field)
        self.partial = partial
        self.attempts = attempts


@dataclass
class CompressContext:
    """What every step of one run shares: the source, its data, the tolerance's
    reference values, where variants go and who hears about progress."""

    spec: CompressSpec
    source: Bundle
    splits: Splits
    metric: str
    base: RowScores  # the source on the held-out rows: what drops are measured against
    base_value: float
    source_val: float
    source_test: float
    out: Path
    say: Events
    measure_runs: int
    result: CompressResult

    def drop(self, value: float) -> float:
        """How much worse ``value`` is than the source's held-out one (positive = worse)."""
        if metric_mode(self.metric) == "max":
            return self.base_value - value
        return value - self.base_value

    def judge(self, bundle: Bundle) -> Judgement:
        """Score ``bundle`` on the held-out rows against the source."""
        scores = row_scores(bundle, self.splits.held_out)
        value = scores.metric(self.metric)
        return Judgement(
            value=value,
            drop=self.drop(value),
            interval=metric_interval(scores, self.metric),
            drop_interval=drop_interval(self.base, scores, self.metric),
            val=metric_value(bundle.evaluate(self.splits.val), self.metric),
        )

    def fits(self, drop: float) -> bool:
        return self.spec.tolerance is None or drop <= self.spec.tolerance.max_drop

    def metric_report(self, *, test: float, judgement: Judgement) -> MetricReport:
        """A variant's ``test``/``val``/held-out metric against the source's."""
        j = judgement
        return MetricReport(
            name=self.metric,
            test=test,
            source_test=self.source_test,
            val=j.val,
            source_val=self.source_val,
            drop=j.drop,
            relative_drop=j.drop / abs(self.base_value) if self.base_value else None,
            held_out=HeldOutReport(
                rows=self.base.rows,
                value=j.value,
                source_value=self.base_value,
                interval=j.interval,
                drop_interval=j.drop_interval,
            ),
        )


def load_compress_spec(source: SpecDocument) -> CompressSpec:
    """Validate a compress spec from a YAML/JSON file, a mapping, or itself."""
    return load_document(CompressSpec, source)


def compress(
    spec: SpecDocument,
    out: str | Path,
    *,
    on_event: Events | None = None,
    measure_runs: int = 50,
    data_root: Path | None = None,
) -> CompressResult:
    """Run ``spec``'s steps from its source bundle; variants are saved under ``out``.

    ``data_root`` (a server's dataset folder) confines image paths to it. Raises
    :class:`CompressToleranceError` (with what fitted) when a step cannot fit. A
    generation source runs :func:`kiln.compress.lm_pipeline.compress_lm` instead.
    """
    checked = load_compress_spec(spec)
    from kiln.lm_bundle_files import manifest_task

    if manifest_task(checked.source) == "generation":
        from kiln.compress.lm_pipeline import compress_lm

        return compress_lm(
            checked, out, on_event=on_event, measure_runs=measure_runs, data_root=data_root
        )
    ctx = _start(checked, Path(out), on_event, measure_runs, data_root)
    parent = ctx.source
    for index, step in enumerate(ctx.spec.steps, start=1):
        parent = _run_step(ctx, step_for(step), parent, f"{index:02d}")
    return ctx.result


def _start(
    spec: CompressSpec,
    out: Path,
    on_event: Events | None,
    measure_runs: int,
    data_root: Path | None,
) -> CompressContext:
    """Load and score the source: the context every step runs in."""
    say = on_event or (lambda _msg: None)
    source = Bundle.load(spec.source)
    splits = _splits(source, spec.data, data_root)
    metric = spec.tolerance.metric if spec.tolerance else headline_metric(source.meta.task)
    _check_metric(metric, source)
    base = row_scores(source, splits.held_out)
    base_value = base.metric(metric)
    interval = metric_interval(base, metric)
    _check_rows(spec, metric, base_value, interval, base.rows)
    say(
        f"source {source.name}: held-out {metric} {base_value:.4f} "
        f"[95% CI {interval.low:.3f}, {interval.high:.3f}] on {base.rows} rows (val + test)"
    )
    result = CompressResult(source=Variant("source", source, source.path, {}), metric=metric)
    ctx = CompressContext(
        spec=spec,
        source=source,
        splits=splits,
        metric=metric,
        base=base,
        base_value=base_value,
        source_val=metric_value(source.evaluate(splits.val), metric),
        source_test=metric_value(source.evaluate(splits.test), metric),
        out=out,
        say=say,
        measure_runs=measure_runs,
        result=result,
    )
    result.source.report = _report(ctx, source, source, [], source.path)
    return ctx


def _check_rows(
    spec: CompressSpec, metric: str, value: float, interval: Interval, rows: int
) -> None:
    """Refuse a tolerance checked on too few rows to mean anything."""
    tolerance = spec.tolerance
    if tolerance is None or rows >= tolerance.min_rows:
        return
    raise SpecError(
        f"the tolerance would be checked on {rows} held-out rows (validation + test), fewer "
        f"than tolerance.min_rows ({tolerance.min_rows}): there the source's {metric} "
        f"{value:.4f} has a 95% confidence interval of {interval.low:.4f}-{interval.high:.4f}, "
        f"too wide to judge a drop of {tolerance.max_drop}; give more labelled rows (data:, "
        "or larger data.split.val/test when training) or set tolerance.min_rows to accept it",
        field="tolerance.min_rows",
    )


def _run_step(ctx: CompressContext, step: CompressStep[Any], parent: Bundle, index: str) -> Bundle:
    """Fit ``step`` to ``parent``, save and measure the variant; returns it."""
    name = f"{index}-{step.kind}"
    variant, attempts = _fit(ctx, step, parent)
    directory = ctx.out / name
    variant.save(directory)
    report = _report(ctx, variant, parent, attempts, directory)
    variant.report = report
    variant.save(directory)
    ctx.result.variants.append(Variant(name, variant, directory, report))
    ctx.say(f"{name}: saved {directory}")
    return variant


def _fit(
    ctx: CompressContext, step: CompressStep[Any], parent: Bundle
) -> tuple[Bundle, list[AttemptRecord]]:
    """Apply ``step``, backing off until the variant is within tolerance (at most
    ``tolerance.retries`` more tries); returns the variant and every attempt."""
    retries = ctx.spec.tolerance.retries if ctx.spec.tolerance else 0
    tried: list[AttemptRecord] = []
    attempt: Attempt | None = step.first()
    while attempt is not None:
        variant = step.apply(parent, ctx.splits, attempt)
        record = AttemptRecord(attempt, ctx.judge(variant))
        tried.append(record)
        ci = record.judgement.drop_interval
        ctx.say(
            f"{step.kind} attempt {attempt.number}: held-out {ctx.metric} {record.value:.4f}, "
            f"drop {record.drop:+.4f} [95% CI {ci.low:+.3f}, {ci.high:+.3f}]"
        )
        if ctx.fits(record.drop):
            return variant, tried
        attempt = step.back_off(parent, ctx.splits, attempt) if len(tried) <= retries else None
    raise _did_not_fit(ctx, step, tried)


def _did_not_fit(
    ctx: CompressContext, step: CompressStep[Any], tried: list[AttemptRecord]
) -> CompressToleranceError:
    assert ctx.spec.tolerance is not None
    return CompressToleranceError(
        f"{step.kind} could not keep held-out {ctx.metric} within "
        f"{ctx.spec.tolerance.max_drop} of the source ({ctx.base_value:.4f}, "
        f"{ctx.base.rows} rows: validation + test) after {len(tried)} attempt(s): "
        + ", ".join(f"{a.value:.4f}" for a in tried)
        + "; the variants before this step are kept",
        field="tolerance.max_drop",
        partial=ctx.result,
        attempts=tried,
    )


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
    val = frame.iloc[parts.val]
    test = frame.iloc[parts.test] if len(parts.test) else val
    held_out = pd.concat([val, frame.iloc[parts.test]]) if len(parts.test) else val
    return Splits(frame.iloc[parts.train], val, test, held_out, spec.train.device)


# ---- scoring and reports ---------------------------------------------------------


def _check_metric(metric: str, bundle: Bundle) -> None:
    from kiln.evaluate.metrics import SCALAR_CLASSIFICATION, SCALAR_REGRESSION

    allowed = SCALAR_CLASSIFICATION if bundle.meta.task == "classification" else SCALAR_REGRESSION
    if metric not in allowed:
        raise SpecError(
            f"tolerance.metric {metric!r} is not one of {list(allowed)}", field="tolerance.metric"
        )


def _report(
    ctx: CompressContext,
    variant: Bundle,
    parent: Bundle,
    attempts: list[AttemptRecord],
    directory: Path | None,
) -> JSONDocument:
    """Score and measure ``variant`` (its metrics land in its manifest); the report as
    compression.json holds it."""
    metric = ctx.metric
    test = variant.evaluate(ctx.splits.test)
    val = variant.evaluate(ctx.splits.val)
    variant.meta.metrics = {"test": test, "val": val}
    judgement = attempts[-1].judgement if attempts else ctx.judge(variant)
    left = sparsity(variant.model)
    report = VariantReport(
        name=variant.name,
        step=variant.meta.lineage.step,
        attempts=[a.to_json(metric) for a in attempts],
        backend=variant.meta.runtime.backend,
        quantization=variant.meta.runtime.quantization,
        excluded_layers=list(attempts[-1].attempt.excluded) if attempts else [],
        model_bytes=_model_bytes(variant),
        disk_bytes=measure.disk_bytes(directory) if directory is not None else None,
        parameters=left.parameters,
        nonzeros=left.nonzeros,
        sparsity=left.sparsity,
        latency=measure.latency(
            variant,
            variant.preprocessor.transform(ctx.splits.test.iloc[:32]),
            runs=ctx.measure_runs,
        ),
        peak_memory_bytes=measure.peak_memory(directory) if directory is not None else None,
        metric=ctx.metric_report(test=metric_value(test, metric), judgement=judgement),
        agreement_with_parent=_agreement(variant, parent, ctx.splits.test),
        machine=measure.machine(),
    )
    return report.model_dump(mode="json")


def _model_bytes(bundle: Bundle) -> int:
    """The ONNX graph's size for onnxruntime variants, else the weights' in memory."""
    if bundle.meta.runtime.backend == "onnxruntime" and bundle.onnx is not None:
        return len(bundle.onnx)
    return sum(t.numel() * t.element_size() for t in bundle.model.state_dict().values())


def _agreement(variant: Bundle, parent: Bundle, frame: pd.DataFrame) -> float:
    """Classification: share of rows with the same predicted label as the parent;
    regression: R² of the variant's predictions against the parent's."""
    a = variant.predict(frame).predictions
    b = parent.predict(frame).predictions
    if variant.meta.task == "classification":
        return float(np.mean([x == y for x, y in zip(a, b, strict=True)]))
    from sklearn.metrics import r2_score

    return float(r2_score(np.asarray(b), np.asarray(a)))
