"""``kiln compress`` for generation bundles: quantize and distill, checked against a
tolerance on held-out examples, each variant measured.

Data: the source's own examples and split, re-read from its lineage and verified
against its fingerprint, or ``data:``'s examples (split with the source spec's fractions;
an imported bundle, which has no spec, with the default ones). The tolerance is checked on
the validation and test examples together:

- ``perplexity`` (the default): the variant's held-out perplexity may rise by at most
  ``max_drop`` *relative* to the source's (0.05: 5%). Every variant is scored on its own
  runtime: torch fp32, torch int8 (quantized at load), or the onnxruntime-genai model's
  own logits (such a variant has no torch weights);
- ``exact_match``: greedy answers against the references, an absolute drop.

A step out of tolerance backs off where it can (int4 -> int8), else raises
:class:`~kiln.compress.pipeline.CompressToleranceError`; the variants before it are kept.
Intervals are 95% percentile bootstraps over examples (paired for the drop).

Each variant is measured and reported by :mod:`kiln.compress.lm_report`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError
from torch.nn import functional as F  # noqa: N812 - the conventional name

from kiln.compress.lm_report import LMScores, variant_report
from kiln.compress.lm_steps import LMData, LMStep, lm_step_for
from kiln.compress.pipeline import (
    AttemptRecord,
    CompressResult,
    CompressToleranceError,
    Judgement,
    SpecDocument,
    Variant,
    load_compress_spec,
)
from kiln.compress.report import Interval
from kiln.compress.steps import Attempt
from kiln.data.dialogs import Example, LMFormat, read_corpus
from kiln.data.lm_encode import IGNORE, encode_examples
from kiln.data.split import holdout
from kiln.errors import BundleError, DataError, SpecError
from kiln.evaluate.lm_eval import evaluate_lm, question
from kiln.lm_bundle import LMBundle
from kiln.manifest import DataRecord, JSONDocument
from kiln.spec.compress import CompressSpec
from kiln.spec.data import Split
from kiln.spec.spec import Spec

LM_METRICS = ("perplexity", "exact_match")


@dataclass
class LMContext:
    """What every step of one run shares (see :class:`~kiln.compress.pipeline.CompressContext`)."""

    spec: CompressSpec
    source: LMBundle
    data: LMData
    metric: str
    base: LMScores
    out: Path
    say: Callable[[str], None]
    runs: int
    result: CompressResult

    def drop(self, value: float, base: float) -> float:
        if self.metric == "perplexity":
            return (value - base) / base
        return base - value

    def judge(self, bundle: LMBundle) -> tuple[Judgement, LMScores]:
        scores = score_lm(bundle, self.data, self.metric)
        value = scores.metric(self.metric)
        val = np.arange(len(self.data.val))

        def paired(rows: np.ndarray) -> float:
            return self.drop(scores.metric(self.metric, rows), self.base.metric(self.metric, rows))

        judgement = Judgement(
            value=value,
            drop=self.drop(value, self.base.metric(self.metric)),
            interval=_bootstrap(scores.rows, lambda rows: scores.metric(self.metric, rows)),
            drop_interval=_bootstrap(scores.rows, paired),
            val=scores.metric(self.metric, val),
        )
        return judgement, scores

    def fits(self, drop: float) -> bool:
        return self.spec.tolerance is None or drop <= self.spec.tolerance.max_drop

    def report(
        self,
        bundle: LMBundle,
        attempts: list[JSONDocument],
        directory: Path | None,
        judgement: Judgement,
        scores: LMScores,
    ) -> JSONDocument:
        """``bundle``'s compression.json (see :func:`~kiln.compress.lm_report.variant_report`)."""
        return variant_report(
            bundle,
            self.data,
            self.metric,
            self.base,
            scores,
            judgement,
            attempts=attempts,
            directory=directory,
            rounds=max(1, self.runs // 25),
        )


def compress_lm(
    spec: SpecDocument,
    out: str | Path,
    *,
    on_event: Callable[[str], None] | None = None,
    measure_runs: int = 50,
    data_root: Path | None = None,
) -> CompressResult:
    """``kiln.compress.pipeline.compress`` for a generation source (``data_root`` does not
    apply: language-model data is read as the source's lineage or ``data:`` names it)."""
    checked = load_compress_spec(spec)
    say = on_event or (lambda _msg: None)
    source = LMBundle.load(checked.source)
    data = lm_data(source, checked.data)
    metric = _metric(checked, data)
    base = score_lm(source, data, metric)
    _check_rows(checked, base.rows)
    say(f"source {source.name}: held-out {metric} {base.metric(metric):.4f} on {base.rows} rows")
    result = CompressResult(source=Variant("source", source, source.path, {}), metric=metric)
    ctx = LMContext(checked, source, data, metric, base, Path(out), say, measure_runs, result)
    result.source.report = ctx.report(source, [], source.path, _self_judgement(ctx), base)
    parent = source
    for index, step_spec in enumerate(checked.steps, start=1):
        step = lm_step_for(step_spec)
        try:
            parent = _run_step(ctx, step, parent, f"{index:02d}")
        finally:
            step.cleanup()
    return result


def _run_step(ctx: LMContext, step: LMStep, parent: LMBundle, index: str) -> LMBundle:
    """Fit ``step`` to ``parent`` (backing off while out of tolerance), save and measure."""
    retries = ctx.spec.tolerance.retries if ctx.spec.tolerance else 0
    tried: list[AttemptRecord] = []
    rows: list[JSONDocument] = []
    for number in range(1, min(step.tries(), retries + 1) + 1):
        variant = step.apply(parent, ctx.data, number)
        judgement, scores = ctx.judge(variant)
        tried.append(AttemptRecord(Attempt(number=number), judgement))
        rows.append({**tried[-1].to_json(ctx.metric), **step.describe(number)})
        ctx.say(
            f"{step.kind} attempt {number}: held-out {ctx.metric} {judgement.value:.4f}, "
            f"drop {judgement.drop:+.4f}"
        )
        if ctx.fits(judgement.drop):
            name = f"{index}-{step.kind}"
            directory = ctx.out / name
            variant.save(directory)
            variant.report = ctx.report(variant, rows, directory, judgement, scores)
            variant.save(directory)
            ctx.result.variants.append(Variant(name, variant, directory, variant.report))
            ctx.say(f"{name}: saved {directory}")
            return variant
    assert ctx.spec.tolerance is not None
    raise CompressToleranceError(
        f"{step.kind} could not keep held-out {ctx.metric} within "
        f"{ctx.spec.tolerance.max_drop} of the source ({ctx.base.metric(ctx.metric):.4f}, "
        f"{ctx.base.rows} examples: validation + test) after {len(tried)} attempt(s): "
        + ", ".join(f"{a.value:.4f}" for a in tried)
        + "; the variants before this step are kept",
        field="tolerance.max_drop",
        partial=ctx.result,
        attempts=tried,
    )


# ---- data --------------------------------------------------------------------------


def lm_data(source: LMBundle, override: str | None) -> LMData:
    """The source's examples split as for training, or ``override``'s (see module doc)."""
    lineage = source.meta.lineage
    recorded = lineage.data or DataRecord()
    where = override if override is not None else recorded.source
    if not where:
        raise DataError("the source bundle records no training data; give data:", field="data")
    if lineage.spec is None:  # an imported model: no split of its own
        corpus, split, device = read_corpus(where), Split(), "auto"
        loss_on: Literal["assistant", "all"] = "assistant"
    else:
        try:
            spec = Spec.model_validate(_generation_spec(lineage.spec))
        except ValidationError:
            raise BundleError(
                "the source bundle's lineage spec is invalid", field="source"
            ) from None
        d = spec.data
        corpus = read_corpus(where, d.format, d.text if isinstance(d.text, str) else None)
        split, loss_on, device = d.split, spec.train.loss_on, spec.train.device
        if override is None and corpus.fingerprint != recorded.fingerprint:
            raise DataError(
                f"the source's training data {where} changed since it was trained "
                "(fingerprint mismatch); give the data to use as data:",
                field="data",
            )
    parts = holdout(pd.Series(np.zeros(len(corpus.examples))), split, stratify=False)

    def pick(idx: np.ndarray) -> list[Example]:
        return [corpus.examples[i] for i in idx]

    val = pick(parts.val)
    if override is None and lineage.spec is not None and spec.data.validation is not None:
        val = _validation_examples(spec.data.validation, corpus.format)
    if not val:
        raise DataError("compression needs validation examples (data.split.val)", field="data")
    return LMData(corpus.format, pick(parts.train), val, pick(parts.test), loss_on, device)


def _validation_examples(source: str, fmt: LMFormat) -> list[Example]:
    """The examples of a separate validation set the source was trained with
    (``data.validation``); a server dataset is not at hand here: give ``data:``."""
    if source.startswith("dataset:"):
        raise DataError(
            f"the source was validated on {source}, a server dataset; give the data to use "
            "as data:",
            field="data",
        )
    return list(read_corpus(source, fmt).examples)


def _generation_spec(doc: JSONDocument) -> JSONDocument:
    """The recorded spec without ``data.target``: a full dump writes its default
    ("label"), which a generation spec refuses as if it had been given."""
    data = doc.get("data")
    if not isinstance(data, dict):
        return doc
    return {**doc, "data": {k: v for k, v in data.items() if k != "target"}}


def _metric(spec: CompressSpec, data: LMData) -> str:
    tolerance = spec.tolerance
    given = tolerance is not None and "metric" in tolerance.model_fields_set
    metric = tolerance.metric if tolerance is not None and given else "perplexity"
    if metric not in LM_METRICS or (metric == "exact_match" and data.format == "text"):
        raise SpecError(
            f"tolerance.metric for a generation bundle is perplexity or exact_match (exact_match "
            f"needs chat or completion data), not {metric!r}",
            field="tolerance.metric",
        )
    return metric


def _check_rows(spec: CompressSpec, rows: int) -> None:
    tolerance = spec.tolerance
    if tolerance is not None and rows < tolerance.min_rows:
        raise SpecError(
            f"the tolerance would be checked on {rows} held-out examples, fewer than "
            f"tolerance.min_rows ({tolerance.min_rows}); give more (data:) or lower min_rows",
            field="tolerance.min_rows",
        )


# ---- scoring -----------------------------------------------------------------------


def score_lm(bundle: LMBundle, data: LMData, metric: str) -> LMScores:
    """``bundle`` on the held-out examples, through the runtime its manifest names."""
    examples = data.held_out
    enc = encode_examples(
        bundle.tokenizer,
        examples,
        data.format,
        max_length=bundle.max_length,
        loss_on=data.loss_on,
        packing=False,
    )
    ids, mask, labels = (
        torch.from_numpy(a) for a in (enc.input_ids, enc.attention_mask, enc.labels)
    )
    if bundle.meta.runtime.backend == "onnxruntime-genai":
        assert bundle.genai is not None
        sums = _genai_losses(bundle.genai, ids, mask, labels)
    else:
        sums = _torch_losses(bundle, ids, mask, labels)
    tokens = (labels[:, 1:] != IGNORE).sum(dim=1).numpy().astype(np.int64)
    hits = _exact_hits(bundle, data) if metric == "exact_match" else None
    return LMScores(np.asarray(sums, dtype=np.float64), tokens, hits)


def _row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss per row: logits (B, L, V), labels (B, L) -> (B,)."""
    loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE, reduction="none"
    )  # (B, L - 1)
    return loss.sum(dim=1)


def _torch_losses(
    bundle: LMBundle, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> list[float]:
    from kiln.runtime.select import runtime_model

    assert bundle.model is not None
    model = runtime_model(bundle.model, bundle.meta.runtime).eval()  # int8: quantized here
    out: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(ids), 8):
            x = torch.stack([ids[start : start + 8], mask[start : start + 8]], dim=1)
            out.extend(_row_loss(model(x), labels[start : start + 8]).tolist())
    return out


def _genai_losses(
    folder: Path, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> list[float]:
    """The genai model's own logits: each example's tokens appended in one prefill,
    whose ``logits`` output is (1, n, V)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    out: list[float] = []
    for row in range(len(ids)):
        n = int(mask[row].sum())
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=n)  # the prefill alone: logits of all n
        generator = og.Generator(model, params)
        generator.append_tokens(ids[row, :n].numpy().astype(np.int32))
        logits = torch.from_numpy(np.asarray(generator.get_output("logits"))[:, :n])
        out.append(float(_row_loss(logits, labels[row : row + 1, :n])[0]))
    return out


def _exact_hits(bundle: LMBundle, data: LMData) -> np.ndarray:
    references = [question(ex)[1] for ex in data.held_out]
    longest = max(len(bundle.tokenizer(r)["input_ids"]) for r in references)
    done = evaluate_lm(
        None,
        bundle.tokenizer,
        bundle.generator,
        data.held_out,
        data.format,
        max_length=bundle.max_length,
        params=bundle.params(max_new_tokens=longest + 4, temperature=0.0),
        prompt=bundle.prompt_ids,
    )
    return np.asarray([float(s.exact) for s in done.scores])


def _bootstrap(n: int, statistic: Callable[[np.ndarray], float]) -> Interval:
    from scipy.stats import bootstrap

    result = bootstrap(
        (np.arange(n),),
        statistic,
        vectorized=False,
        n_resamples=999,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(0),
    )
    ci = result.confidence_interval
    return Interval(low=float(ci.low), high=float(ci.high), method="bootstrap")


def _self_judgement(ctx: LMContext) -> Judgement:
    """The source against itself: drop 0 by definition."""
    value = ctx.base.metric(ctx.metric)
    none = Interval(low=0.0, high=0.0, method="bootstrap")
    interval = _bootstrap(ctx.base.rows, lambda rows: ctx.base.metric(ctx.metric, rows))
    val = ctx.base.metric(ctx.metric, np.arange(len(ctx.data.val)))
    return Judgement(value=value, drop=0.0, interval=interval, drop_interval=none, val=val)
