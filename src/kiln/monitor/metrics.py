"""Prometheus metrics of the serving path, in the official client's text format.

One registry per app (tests build several apps in one process). Latencies are in
seconds, as Prometheus expects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
            ["deployment", "version", "code"],
            registry=r,
        )
        self.rows = Counter(
            "kiln_rows",
            "Rows predicted by deployment and version.",
            ["deployment", "version"],
            registry=r,
        )
        self.total = Histogram(
            "kiln_request_seconds",
            "Inference request latency, end to end inside the server.",
            ["deployment"],
            buckets=LATENCY,
            registry=r,
        )
        self.queue_wait = Histogram(
            "kiln_queue_wait_seconds",
            "Time a request waited for its batch to start.",
            ["deployment", "version"],
            buckets=LATENCY,
            registry=r,
        )
        self.model_time = Histogram(
            "kiln_model_seconds",
            "Time of one batch's preprocessing and forward pass.",
            ["deployment", "version"],
            buckets=LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "kiln_batch_rows",
            "Rows per executed batch.",
            ["deployment", "version"],
            buckets=BATCH,
            registry=r,
        )
        self.queue_depth = Gauge(
            "kiln_queue_depth",
            "Requests waiting for a batch.",
            ["deployment", "version"],
            registry=r,
        )
        self.load_seconds = Gauge(
            "kiln_model_load_seconds",
            "Time to load, export and warm up a version.",
            ["deployment", "version"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_drift(self, reports: Callable[[], Iterable[tuple[str, dict[str, Any]]]]) -> None:
        """Expose the drift reports ``reports()`` yields, as (deployment, report), at each
        scrape (see :class:`DriftCollector`)."""
        self.registry.register(DriftCollector(reports))


class DriftCollector(Collector):
    """``kiln_drift_psi{deployment, column}`` and ``kiln_drift_flagged_columns{deployment}``,
    computed when scraped, so they are always as current as the deployment's window.

    A deployment whose version has no reference statistics has no series.
    """

    def __init__(self, reports: Callable[[], Iterable[tuple[str, dict[str, Any]]]]) -> None:
        self.reports = reports

    def describe(self) -> list[Any]:
        return []  # nothing to compute at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        psi = GaugeMetricFamily(
            "kiln_drift_psi",
            "Population stability index of a deployment's recent inputs against its "
            "training data, per input column.",
            labels=["deployment", "column"],
        )
        flagged = GaugeMetricFamily(
            "kiln_drift_flagged_columns",
            "Input columns of a deployment whose PSI is past the drift threshold.",
            labels=["deployment"],
        )
        for deployment, report in self.reports():
            if not report.get("reference", True):
                continue
            for column, values in report["columns"].items():
                if values["psi"] is not None:
                    psi.add_metric([deployment, column], values["psi"])
            flagged.add_metric([deployment], len(report["drifted"]))
        yield psi
        yield flagged
