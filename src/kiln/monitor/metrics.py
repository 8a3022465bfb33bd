"""Prometheus metrics of the serving path, in the official client's text format.

One registry per app (tests build several apps in one process). Latencies are in
seconds, as Prometheus expects. Every ``kiln_*`` series is labelled with the project
that owns the deployment (two projects may both have a deployment named ``api``), and
:meth:`ServingMetrics.render` shows a project's key only that project's series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kiln.monitor.live import DriftReport

# 0.5 ms … 10 s: an MLP answers in well under a millisecond, a text model in tens
LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    """The series ``/metrics`` exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process CPU seconds, resident memory
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "kiln_requests",
            "Inference requests by deployment, version and HTTP status code.",
            ["project", "deployment", "version", "code"],
            registry=r,
        )
        self.rows = Counter(
            "kiln_rows",
            "Rows predicted by deployment and version.",
            ["project", "deployment", "version"],
            registry=r,
        )
        self.total = Histogram(
            "kiln_request_seconds",
            "Inference request latency, end to end inside the server.",
            ["project", "deployment"],
            buckets=LATENCY,
            registry=r,
        )
        self.queue_wait = Histogram(
            "kiln_queue_wait_seconds",
            "Time a request waited for its batch to start.",
            ["project", "deployment", "version"],
            buckets=LATENCY,
            registry=r,
        )
        self.model_time = Histogram(
            "kiln_model_seconds",
            "Time of one batch's preprocessing and forward pass.",
            ["project", "deployment", "version"],
            buckets=LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "kiln_batch_rows",
            "Rows per executed batch.",
            ["project", "deployment", "version"],
            buckets=BATCH,
            registry=r,
        )
        self.queue_depth = Gauge(
            "kiln_queue_depth",
            "Requests waiting for a batch.",
            ["project", "deployment", "version"],
            registry=r,
        )
        self.load_seconds = Gauge(
            "kiln_model_load_seconds",
            "Time to load, export and warm up a version.",
            ["project", "deployment", "version"],
            registry=r,
        )
        self.rate_limited = Counter(
            "kiln_rate_limited",
            "Requests refused (429) by a rate limit, by lane (inference or api) and by "
            "whose limit it was (key or project); the project is the key's ('' if global).",
            ["project", "lane", "limit"],
            registry=r,
        )

        self.llm = LLMMetrics(r)

    def render(self, project: str | None = None) -> bytes:
        """The text format: every series, or with ``project`` only that project's
        ``kiln_*`` series (and the process-wide ones, which belong to no project)."""
        if project is None:
            return generate_latest(self.registry)
        return generate_latest(ProjectView(self.registry, project))

    def forget(self, project: str, deployment: str, version: int) -> None:
        """Drop the gauges of a version a deployment no longer routes to (its queue-depth
        gauge would otherwise keep the closed batcher, and its last value, forever)."""
        for gauge in (self.queue_depth, self.load_seconds, *self.llm.gauges):
            with suppress(KeyError):
                gauge.remove(project, deployment, str(version))

    def watch_drift(self, reports: Callable[[], Iterable[tuple[str, str, DriftReport]]]) -> None:
        """Expose the drift reports ``reports()`` yields, as (project, deployment, report),
        at each scrape (see :class:`DriftCollector`)."""
        self.registry.register(DriftCollector(reports))


# time to first token: a prefill of a long prompt on a CPU takes seconds
FIRST_TOKEN = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LLMMetrics:
    """The language-model series of ``/v1`` (fed by :mod:`kiln.monitor.token_meter`),
    all labelled ``{project, deployment, version}``:

    - ``kiln_llm_time_to_first_token_seconds`` (histogram): submission to first token,
      per sequence, as the engine measured it;
    - ``kiln_llm_inter_token_latency_seconds`` (histogram): per generated token after
      the first, the time since the sequence's previous tokens reached the server's
      answer (a step that released k tokens at once counts k times dt/k);
    - ``kiln_llm_prompt_tokens_total``, ``kiln_llm_completion_tokens_total``
      (counters), counted as they are submitted and generated. Output tokens per
      second: ``sum by (deployment) (rate(kiln_llm_completion_tokens_total[1m]))``;
    - ``kiln_llm_running_sequences``, ``kiln_llm_waiting_sequences``,
      ``kiln_llm_kv_cache_tokens``, ``kiln_llm_kv_cache_budget_tokens`` (gauges), set
      by the engine's ``on_step`` hook after every step. An engine that serves several
      deployments (one version, same limits) reports the same numbers under each.
      KV-cache use: ``kiln_llm_kv_cache_tokens / kiln_llm_kv_cache_budget_tokens``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["project", "deployment", "version"]
        r = registry
        self.first_token = Histogram(
            "kiln_llm_time_to_first_token_seconds",
            "Time from a sequence's submission to its first generated token.",
            labels,
            buckets=FIRST_TOKEN,
            registry=r,
        )
        self.inter_token = Histogram(
            "kiln_llm_inter_token_latency_seconds",
            "Time between a sequence's generated tokens after the first.",
            labels,
            buckets=INTER_TOKEN,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kiln_llm_prompt_tokens", "Prompt tokens submitted.", labels, registry=r
        )
        self.completion_tokens = Counter(
            "kiln_llm_completion_tokens", "Completion tokens generated.", labels, registry=r
        )
        self.running = Gauge(
            "kiln_llm_running_sequences", "Sequences decoding now.", labels, registry=r
        )
        self.waiting = Gauge(
            "kiln_llm_waiting_sequences", "Sequences waiting for a slot.", labels, registry=r
        )
        self.kv_tokens = Gauge(
            "kiln_llm_kv_cache_tokens",
            "KV-cache tokens (prompt + generated) of the running sequences.",
            labels,
            registry=r,
        )
        self.kv_budget = Gauge(
            "kiln_llm_kv_cache_budget_tokens",
            "The engine's KV-cache budget in tokens (absent when unbounded).",
            labels,
            registry=r,
        )

    @property
    def gauges(self) -> tuple[Gauge, ...]:
        """The per-version gauges (dropped with the version, see ``forget``)."""
        return (self.running, self.waiting, self.kv_tokens, self.kv_budget)


class ProjectView:
    """A registry's families with only one project's ``kiln_*`` samples, for
    ``generate_latest`` (which needs nothing but ``collect``)."""

    def __init__(self, registry: CollectorRegistry, project: str) -> None:
        self.registry = registry
        self.project = project

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if not family.name.startswith("kiln_"):
                yield family
                continue
            mine = Metric(family.name, family.documentation, family.type, family.unit)
            mine.samples = [s for s in family.samples if s.labels.get("project") == self.project]
            yield mine


class DriftCollector(Collector):
    """``kiln_drift_psi{project, deployment, column}`` and
    ``kiln_drift_flagged_columns{project, deployment}``,
    computed when scraped, so they are always as current as the deployment's window.

    A deployment whose version has no reference statistics has no series.
    """

    def __init__(self, reports: Callable[[], Iterable[tuple[str, str, DriftReport]]]) -> None:
        self.reports = reports

    def describe(self) -> list[Any]:
        return []  # nothing to compute at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        psi = GaugeMetricFamily(
            "kiln_drift_psi",
            "Population stability index of a deployment's recent inputs against its "
            "training data, per input column.",
            labels=["project", "deployment", "column"],
        )
        flagged = GaugeMetricFamily(
            "kiln_drift_flagged_columns",
            "Input columns of a deployment whose PSI is past the drift threshold.",
            labels=["project", "deployment"],
        )
        for project, deployment, report in self.reports():
            if not report.get("reference", True):
                continue
            for column, values in report["columns"].items():
                if values["psi"] is not None:
                    psi.add_metric([project, deployment, column], values["psi"])
            flagged.add_metric([project, deployment], len(report["drifted"]))
        yield psi
        yield flagged
