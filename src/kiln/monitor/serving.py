"""The monitor of a server's deployments: what each prediction leaves behind.

The deployment manager calls :meth:`DeploymentMonitor.admit` before a request (the
project's prediction quotas, QuotaError 429) and :meth:`DeploymentMonitor.observe`
once after it, answered or not; each batcher calls the recorder of
:meth:`DeploymentMonitor.batches` once per batch. What they record:

- the deployment's live window (:class:`~kiln.monitor.live.RequestWindow`): every
  request with its HTTP-equivalent status, and every batch;
- Prometheus series (:class:`~kiln.monitor.metrics.ServingMetrics`): rows answered,
  batch sizes, model time, queue waits;
- for an answered request only: the metered usage
  (:class:`~kiln.monitor.metering.PredictionMeter`), the drift feed of the deployment
  (:class:`~kiln.monitor.live.DriftFeed`) and the prediction log
  (:class:`~kiln.monitor.predlog.PredictionLog`).

Usage and the prediction log are written by a background task every
``KILN_MONITOR_FLUSH_SECONDS``, and on :meth:`DeploymentMonitor.close`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from kiln.monitor.live import DriftFeed, DriftReport, RequestWindow, no_drift
from kiln.monitor.metering import PredictionMeter
from kiln.monitor.metrics import ServingMetrics
from kiln.monitor.predlog import Inputs, Output, PredictionLog
from kiln.settings import Settings
from kiln.store.artifacts import ArtifactStore
from kiln.store.db import Database

log = logging.getLogger("kiln.monitor")


@dataclass
class DeploymentWatch:
    """What is monitored of one deployment, in memory."""

    project: str  # the project's name (metric labels, artifact keys)
    name: str
    window: RequestWindow = field(default_factory=RequestWindow)
    drift: DriftFeed | None = None  # against the reference of one version; None: no routes


@dataclass(frozen=True)
class Answer:
    """What an answered request produced."""

    version: int  # the version that answered
    frame: pd.DataFrame  # its checked rows, in schema order (drift)
    inputs: Inputs  # what the prediction log keeps: the request's rows, or ``frame``
    output: Output


@dataclass(frozen=True)
class Served:
    """One request to a deployment, as the manager saw it end."""

    project_id: int
    rows: int  # rows asked for
    seconds: float  # from arrival to answer (or error)
    status: int  # 200, or the HTTP status of its error (499: the caller went away)
    version: int | None  # the version that answered, or was last tried
    admitted: bool  # its rows were held against the quotas (released unless answered)
    answer: Answer | None = None  # set when answered (status 200)


class BatchFigures(Protocol):
    """What one batch cost (:class:`kiln.serve.batcher.BatchStats`)."""

    @property
    def rows(self) -> int: ...
    @property
    def waits(self) -> Sequence[float]: ...
    @property
    def model_seconds(self) -> float: ...


class DeploymentMonitor:
    """Meters, logs and watches the predictions of every deployment of one server.

    ``watches`` lists the deployments being served (for drift at each scrape).
    """

    def __init__(
        self,
        db: Database,
        store: ArtifactStore,
        metrics: ServingMetrics,
        settings: Settings,
        watches: Callable[[], Iterable[DeploymentWatch]],
    ) -> None:
        self.metrics = metrics
        self.settings = settings
        self.meter = PredictionMeter(db)
        self.predlog = PredictionLog(
            store,
            sample=settings.prediction_log_sample,
            max_bytes=int(settings.prediction_log_max_mb * (1 << 20)),
        )
        self._watches = watches
        metrics.watch_drift(self._drift_reports)
        self._ticker: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the background flush (once; not after :meth:`close`)."""
        if self._ticker is None and not self._stop.is_set():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def close(self) -> None:
        """Stop the background flush, then write what is still buffered."""
        self._stop.set()
        if self._ticker is not None:
            await self._ticker  # finishes a flush it may be in
        await self.flush()

    async def flush(self) -> None:
        """Write the metered usage and the prediction log's buffers now."""
        await self.meter.flush()
        await self.predlog.flush()

    async def _tick(self) -> None:
        while not self._stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.monitor_flush_seconds)
            if self._stop.is_set():
                return  # close() flushes once more itself
            try:
                await self.flush()
            except Exception:
                log.exception("monitoring flush failed")

    # ---- the serving path ---------------------------------------------------------

    async def admit(self, project_id: int, rows: int) -> None:
        """Hold a request of ``rows`` rows against the project's prediction quotas
        (QuotaError, 429, names the quota it would pass); :meth:`observe` settles it."""
        self.start()
        if self.meter.needs_load(project_id):
            await self.meter.prepare(project_id)
        self.meter.reserve(project_id, rows)

    def observe(self, watch: DeploymentWatch, served: Served) -> None:
        """Record one request: in the window always; if answered, in the metrics, the
        metered usage, the drift feed and (sampled) the prediction log."""
        answer = served.answer
        if answer is not None:
            labels = (watch.project, watch.name, str(answer.version))
            self.metrics.rows.labels(*labels).inc(len(answer.frame))
            self.meter.commit(served.project_id, watch.name, served.rows)
            if watch.drift is not None:
                watch.drift.add(answer.frame)
            self.predlog.offer(
                watch.project, watch.name, answer.version, answer.inputs, answer.output
            )
        elif served.admitted:
            self.meter.release(served.project_id, served.rows)
        watch.window.record(served.seconds, served.status, served.rows, served.version)

    def batches(self, watch: DeploymentWatch, version: int) -> Callable[[BatchFigures], None]:
        """The recorder of one route's batches (the batcher calls it once per batch)."""
        labels = (watch.project, watch.name, str(version))
        window = watch.window
        batch_size = self.metrics.batch_size.labels(*labels)
        model_time = self.metrics.model_time.labels(*labels)
        queue_wait = self.metrics.queue_wait.labels(*labels)

        def record(stats: BatchFigures) -> None:
            window.record_batch(stats.rows)
            batch_size.observe(stats.rows)
            model_time.observe(stats.model_seconds)
            for seconds in stats.waits:
                queue_wait.observe(seconds)

        return record

    # ---- drift ----------------------------------------------------------------------

    def follow(
        self, watch: DeploymentWatch, version: int | None, reference: Mapping[str, Any]
    ) -> None:
        """Watch drift against ``version``'s ``reference`` statistics (its bundle's);
        a feed already on that version keeps its rows. ``None``: nothing is served."""
        if version is None:
            watch.drift = None
        elif watch.drift is None or watch.drift.version != version:
            watch.drift = DriftFeed(
                dict(reference),
                size=self.settings.drift_window,
                threshold=self.settings.drift_threshold,
                version=version,
            )

    def drift(self, watch: DeploymentWatch, unavailable: str) -> DriftReport:
        """The drift report of the deployment's recent inputs; without a feed, a report
        saying ``unavailable``. Computes (milliseconds): call it off the event loop."""
        if watch.drift is None:
            return no_drift(self.settings.drift_threshold, None, unavailable)
        return watch.drift.report()

    def _drift_reports(self) -> Iterator[tuple[str, str, DriftReport]]:
        """Every drift report, for a scrape (another thread: one failure skips one)."""
        for watch in list(self._watches()):
            if watch.drift is None:
                continue
            try:
                yield watch.project, watch.name, watch.drift.report()
            except Exception:
                log.exception("drift report of %s failed", watch.name)
