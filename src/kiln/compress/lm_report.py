"""What ``kiln compress`` measures and reports for a generation variant (or its source).

Each variant's ``compression.json`` (:class:`LMVariantReport`) holds the size of the
weights it runs, greedy tokens/s at batch 1 and 8 (``SPEED_TOKENS`` new tokens on held-out
prompts), the first-token latency and the tolerance metric against the source's
(:class:`LMMetricReport`); :func:`lm_rows` flattens the reports for the CLI table and
``report.json``. The scoring itself is in :mod:`kiln.compress.lm_pipeline`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from kiln.compress import measure
from kiln.compress.lm_steps import LMData
from kiln.compress.pipeline import CompressResult, Judgement
from kiln.compress.report import Interval, Machine
from kiln.data.dialogs import Example
from kiln.data.lm_encode import prompt_ids
from kiln.evaluate.lm_eval import question
from kiln.lm_bundle import LMBundle
from kiln.manifest import JSONDocument, StepRecord

SPEED_TOKENS = 32  # new tokens per prompt when measuring speed
SPEED_PROMPTS = 4  # batch-1 prompts timed (each once per round)


class GenerationSpeed(BaseModel):
    """Greedy decoding on this machine: tokens/s at batch 1 and 8, first-token latency."""

    prompts: int
    max_new_tokens: int
    tokens_per_s_batch1: float
    tokens_per_s_batch8: float
    first_token_ms: float  # median, at batch 1
    threads: int


class LMMetricReport(BaseModel):
    """The tolerance metric on the held-out examples against the source's. ``drop``:
    positive = worse (relative for perplexity, absolute for exact_match)."""

    name: str
    relative: bool
    rows: int
    value: float
    source_value: float
    drop: float
    interval: Interval
    drop_interval: Interval
    val: float
    source_val: float
    test: float
    source_test: float


class LMVariantReport(BaseModel):
    """``compression.json`` of a generation variant (or the source)."""

    task: str = "generation"
    name: str
    step: StepRecord | None
    attempts: list[JSONDocument]
    backend: str
    quantization: str | None
    model_bytes: int  # the weights it runs: genai's ONNX files, or the torch tensors
    disk_bytes: int | None
    parameters: int
    perplexity: float  # held-out, on the variant's own runtime
    speed: GenerationSpeed
    metric: LMMetricReport
    machine: Machine


@dataclass(frozen=True)
class LMScores:
    """Per held-out example: summed token loss and labelled tokens; greedy exact hits."""

    loss_sum: np.ndarray  # (N,) float64
    tokens: np.ndarray  # (N,) int64
    hits: np.ndarray | None  # (N,) float64, 1.0 where the answer matched (exact_match)

    @property
    def rows(self) -> int:
        return len(self.tokens)

    def metric(self, name: str, rows: np.ndarray | slice = slice(None)) -> float:
        """``name`` over ``rows`` (positions; default all)."""
        if name == "exact_match":
            assert self.hits is not None
            return float(np.mean(self.hits[rows]))
        loss = float(self.loss_sum[rows].sum()) / max(int(self.tokens[rows].sum()), 1)
        return float(np.exp(min(loss, 700.0)))


def generation_speed(bundle: LMBundle, examples: Sequence[Example], rounds: int) -> GenerationSpeed:
    """Greedy tokens/s at batch 1 (``SPEED_PROMPTS`` prompts, one by one) and at batch 8
    (8 prompts in one call), after a warm-up, over at least 3 rounds; first-token
    latency is the median at batch 1. Rates are end to end (prefill included) over the
    tokens each answer took until its EOS or ``SPEED_TOKENS``."""
    rounds = max(rounds, 3)  # one or two rounds of a few prompts swing with the machine
    prompts = [_prompt(bundle, ex) for ex in examples[:8]]
    prompts = [prompts[i % len(prompts)] for i in range(8)]
    params = bundle.params(max_new_tokens=SPEED_TOKENS, temperature=0.0)
    generator = bundle.generator
    generator.generate(prompts[:1], params)  # warm-up
    tokens, seconds, first = 0, 0.0, []
    for _ in range(rounds):
        for p in prompts[:SPEED_PROMPTS]:
            t0 = time.perf_counter()
            done = generator.generate([p], params)[0]
            seconds += time.perf_counter() - t0
            tokens += done.completion_tokens
            if done.first_token_s is not None:
                first.append(done.first_token_s)
    batch_tokens, batch_seconds = 0, 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        batch_tokens += sum(c.completion_tokens for c in generator.generate(prompts, params))
        batch_seconds += time.perf_counter() - t0
    return GenerationSpeed(
        prompts=len(prompts),
        max_new_tokens=SPEED_TOKENS,
        tokens_per_s_batch1=tokens / max(seconds, 1e-9),
        tokens_per_s_batch8=batch_tokens / max(batch_seconds, 1e-9),
        first_token_ms=statistics.median(first) * 1e3 if first else seconds / rounds * 1e3,
        threads=torch.get_num_threads(),
    )


def _prompt(bundle: LMBundle, example: Example) -> list[int]:
    if example.text is not None:  # a text corpus: its opening words
        return prompt_ids(bundle.tokenizer, example.text[:64], chat=False)
    asked, _ = question(example)
    return bundle.prompt_ids(asked)  # as generate prompts it


def model_bytes(bundle: LMBundle) -> int:
    """Bytes of the weights the variant runs: the genai ONNX files, or the torch
    module's tensors as its runtime holds them (int8 packed weights count 1 byte)."""
    if bundle.meta.runtime.backend == "onnxruntime-genai" and bundle.genai is not None:
        return sum(p.stat().st_size for p in bundle.genai.iterdir() if ".onnx" in p.name)
    from kiln.runtime.select import runtime_model

    assert bundle.model is not None
    total = 0
    for value in runtime_model(bundle.model, bundle.meta.runtime).state_dict().values():
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def variant_report(
    bundle: LMBundle,
    data: LMData,
    metric: str,
    base: LMScores,
    scores: LMScores,
    judgement: Judgement,
    *,
    attempts: list[JSONDocument],
    directory: Path | None,
    rounds: int,
) -> JSONDocument:
    """Measure ``bundle`` (its held-out metrics land in its manifest): compression.json.

    ``scores`` are ``bundle``'s on ``data.held_out``, ``base`` the source's, ``judgement``
    its tolerance metric against the source's; ``attempts`` is empty for the source
    itself; ``rounds``: timing rounds of :func:`generation_speed`.
    """
    n_val = len(data.val)
    val, test = np.arange(n_val), np.arange(n_val, scores.rows) if data.test else None
    test = test if test is not None else val
    if attempts:  # a variant: its held-out perplexity (the source keeps its own metrics)
        bundle.meta.metrics = {
            "val": {"perplexity": scores.metric("perplexity", val), "rows": n_val},
            "test": {"perplexity": scores.metric("perplexity", test), "rows": len(test)},
        }
    held_out = LMMetricReport(
        name=metric,
        relative=metric == "perplexity",
        rows=scores.rows,
        value=judgement.value,
        source_value=base.metric(metric),
        drop=judgement.drop,
        interval=judgement.interval,
        drop_interval=judgement.drop_interval,
        val=judgement.val,
        source_val=base.metric(metric, val),
        test=scores.metric(metric, test),
        source_test=base.metric(metric, test),
    )
    report = LMVariantReport(
        name=bundle.name,
        step=bundle.meta.lineage.step if attempts else None,
        attempts=attempts,
        backend=bundle.meta.runtime.backend,
        quantization=bundle.meta.runtime.quantization,
        model_bytes=model_bytes(bundle),
        disk_bytes=measure.disk_bytes(directory) if directory is not None else None,
        parameters=bundle.meta.parameters,
        perplexity=scores.metric("perplexity"),
        speed=generation_speed(bundle, data.held_out, rounds),
        metric=held_out,
        machine=measure.machine(),
    )
    return report.model_dump(mode="json")


def lm_rows(reports: list[JSONDocument], names: list[str]) -> list[dict[str, Any]]:
    """One flat row per variant for the CLI table and report.json."""
    out: list[dict[str, Any]] = []
    for name, raw in zip(names, reports, strict=True):
        r = LMVariantReport.model_validate(raw)
        out.append(
            {
                "variant": name,
                "backend": r.backend + (f" {r.quantization}" if r.quantization else ""),
                "parameters": r.parameters,
                "model_bytes": r.model_bytes,
                "tokens_per_s_b1": r.speed.tokens_per_s_batch1,
                "tokens_per_s_b8": r.speed.tokens_per_s_batch8,
                "first_token_ms": r.speed.first_token_ms,
                "perplexity": r.perplexity,
                r.metric.name: r.metric.value,
                "drop": r.metric.drop,
                "drop_low": r.metric.drop_interval.low,
                "drop_high": r.metric.drop_interval.high,
                "held_out_rows": r.metric.rows,
            }
        )
    return out


def is_generation(result: CompressResult) -> bool:
    """Whether ``result`` came from :func:`~kiln.compress.lm_pipeline.compress_lm`
    (its reports are LM reports)."""
    return result.source.report.get("task") == "generation"
