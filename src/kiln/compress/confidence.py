"""How sure a tolerance check is: a bundle's metric on held-out rows, with 95% intervals.

The metric's interval is Wilson's score interval for accuracy (a proportion of rows;
``scipy.stats.binomtest``) and a percentile bootstrap over rows for any other metric.
The interval of a variant's *drop* versus the source is a paired bootstrap: both are
scored on the same resampled rows, so what the two models share cancels out
(``scipy.stats.bootstrap``, seeded: the same data gives the same interval).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from kiln.bundle import Bundle
from kiln.compress.report import Interval
from kiln.evaluate.metrics import metric_value
from kiln.evaluate.scoring import score
from kiln.spec.spec import metric_mode

CONFIDENCE = 0.95  # as Interval.confidence records it
RESAMPLES = 999  # bootstrap resamples: the interval's ends move by < 0.01 between seeds
SEED = 0


@dataclass(frozen=True)
class RowScores:
    """A bundle's raw outputs on labelled rows: what any metric on any subset needs."""

    bundle: Bundle
    outputs: np.ndarray  # (N, K) logits or (N, 1) scaled values
    y: np.ndarray  # the encoded targets

    @property
    def rows(self) -> int:
        return len(self.y)

    def metric(self, name: str, rows: np.ndarray | None = None) -> float:
        """``name`` on ``rows`` (positions; default all): the same value Bundle.evaluate gives."""
        picked = slice(None) if rows is None else rows
        outputs = torch.from_numpy(self.outputs[picked])
        return metric_value(score(self.bundle.preprocessor, outputs, self.y[picked]), name)

    def correct(self) -> np.ndarray:
        """Classification: 1.0 where the predicted class is the true one."""
        hits: np.ndarray = (self.outputs.argmax(axis=1) == self.y).astype(np.float64)
        return hits


def row_scores(bundle: Bundle, frame: pd.DataFrame) -> RowScores:
    """Score ``bundle`` on ``frame``'s rows that have a target (as Bundle.evaluate does)."""
    frame = frame[frame[bundle.meta.target].notna()].reset_index(drop=True)
    pre = bundle.preprocessor
    outputs = bundle.backend.forward(pre.transform(frame))
    return RowScores(bundle, np.asarray(outputs), pre.transform_target(frame[bundle.meta.target]))


def metric_interval(scores: RowScores, metric: str) -> Interval:
    """The 95% interval of ``metric`` on these rows."""
    if metric == "accuracy":
        from scipy.stats import binomtest

        hits = int(scores.correct().sum())
        ci = binomtest(hits, scores.rows).proportion_ci(CONFIDENCE, method="wilson")
        return Interval(low=float(ci.low), high=float(ci.high), method="wilson")
    return _bootstrap(scores.rows, lambda rows: scores.metric(metric, rows))


def drop_interval(source: RowScores, variant: RowScores, metric: str) -> Interval:
    """The 95% interval of the variant's drop versus the source (positive = worse),
    both scored on the same rows."""
    sign = 1.0 if metric_mode(metric) == "max" else -1.0
    if metric == "accuracy":  # a mean of per-row differences: resample those directly
        diff = source.correct() - variant.correct()
        return _bootstrap_mean(diff)
    return _bootstrap(
        source.rows,
        lambda rows: sign * (source.metric(metric, rows) - variant.metric(metric, rows)),
    )


def _bootstrap(n: int, statistic: Callable[[np.ndarray], float]) -> Interval:
    """Percentile bootstrap of ``statistic`` over resampled row positions 0..n-1."""
    return _percentile(np.arange(n), statistic, vectorized=False)


def _bootstrap_mean(values: np.ndarray) -> Interval:
    return _percentile(values, np.mean, vectorized=True)


def _percentile(data: np.ndarray, statistic: Callable[..., Any], *, vectorized: bool) -> Interval:
    from scipy.stats import bootstrap

    result = bootstrap(
        (data,),
        statistic,
        vectorized=vectorized,
        n_resamples=RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(SEED),
    )
    ci = result.confidence_interval
    return Interval(low=float(ci.low), high=float(ci.high), method="bootstrap")
