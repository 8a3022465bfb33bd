"""Deployments: named endpoints over registered versions, with weighted routes.

The manager holds every deployment of the server in memory (its routes, each a
loaded model behind a batcher) and persists its definition in the database
(:mod:`kiln.store.deployments`), so a restarted server restores them. Changing the
routes (hot swap, canary, rollback) loads any new version beside the old ones, warms it
up, switches in one assignment, and only then closes the old batchers, which answer
what they already queued: no request fails because of a swap. A loaded model is cached
for as long as some deployment routes to it (two deployments of one version share it);
once a swap or a delete leaves it unused, nothing keeps it, in memory or on local disk.

Every prediction is also monitored here: each deployment keeps a window of its recent
requests and batches (:meth:`DeploymentManager.window`) and a drift feed against the
reference statistics of its main version (:meth:`DeploymentManager.drift`); the
manager meters predictions per project (with quotas) and samples them into the
prediction log, both written by a background task every ``KILN_MONITOR_FLUSH_SECONDS``
and on close.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kiln.errors import ConflictError, KilnError, NotFoundError
from kiln.monitor.live import DriftFeed, RequestWindow, no_drift
from kiln.monitor.metering import PredictionMeter
from kiln.monitor.metrics import ServingMetrics
from kiln.monitor.predlog import PredictionLog
from kiln.serve.batcher import Batcher, BatchStats, Closed, DeadlineExceeded, QueueFull
from kiln.serve.model import Output, ServedModel
from kiln.settings import Settings
from kiln.store.artifacts import ArtifactStore
from kiln.store.db import Database
from kiln.store.deployments import (
    all_deployments,
    config_of,
    pick_config,
    remove_deployment,
    resolve_routes,
    save_deployment,
)
from kiln.store.projects import check_name
from kiln.store.tables import DeploymentState, Project

log = logging.getLogger("kiln.serve")
T = TypeVar("T")


@dataclass
class Route:
    version: int
    weight: int
    batcher: Batcher


@dataclass
class Live:
    """A deployment as the server holds it."""

    project_id: int
    name: str
    model: str
    routes: list[Route] = field(default_factory=list)
    state: DeploymentState = DeploymentState.loading
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    project: str = ""  # the project's name (artifact keys)
    window: RequestWindow = field(default_factory=RequestWindow)
    drift: DriftFeed | None = None  # against the reference of the heaviest route's version

    def pick(self) -> Route:
        if not self.routes:
            raise ConflictError(f"deployment {self.name} is {self.state.value}", field="name")
        if len(self.routes) == 1:
            return self.routes[0]
        weights = [r.weight for r in self.routes]
        return random.choices(self.routes, weights=weights)[0]  # noqa: S311 - traffic split


class DeploymentManager:
    """Creates, changes, restores and removes deployments; answers predictions."""

    def __init__(
        self,
        db: Database,
        store: ArtifactStore,
        cache_dir: Path,
        metrics: ServingMetrics,
        settings: Settings | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.cache_dir = cache_dir
        self.metrics = metrics
        self.settings = settings or Settings()
        self.live: dict[tuple[int, str], Live] = {}
        self._models: dict[tuple[str, str], ServedModel] = {}  # (version id, backend)
        self._lock = asyncio.Lock()
        self.meter = PredictionMeter(db)
        self.predlog = PredictionLog(
            store,
            sample=self.settings.prediction_log_sample,
            max_bytes=int(self.settings.prediction_log_max_mb * (1 << 20)),
        )
        metrics.watch_drift(self._drift_reports)
        self._ticker: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------

    async def restore(self) -> None:
        """Bring back every persisted deployment (a failure marks that one failed)."""
        self._start_ticker()
        rows = await self._in_session(all_deployments)
        for row, project in rows:
            live = Live(row.project_id, row.name, row.model, config=config_of(row), project=project)
            self.live[(row.project_id, row.name)] = live
            try:
                live.routes = await self._build_routes(live, row.routes)
                live.state = DeploymentState.ready
                self._watch_drift(live)
            except Exception as exc:
                live.state, live.error = DeploymentState.failed, str(exc)
                log.error("deployment %s could not be restored: %s", row.name, exc)

    def ready(self) -> bool:
        return all(d.state == DeploymentState.ready for d in self.live.values())

    async def close(self) -> None:
        """Close every batcher (they answer what they queued), then write the last
        metered usage and prediction log records."""
        self._stop.set()
        for live in self.live.values():
            for route in live.routes:
                await route.batcher.close()
        self.live.clear()
        self._models.clear()
        # the decrypted copies of bundles live only while they are served
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        if self._ticker is not None:
            await self._ticker  # finishes a flush it may be in
        await self.flush()

    def _start_ticker(self) -> None:
        if self._ticker is None and not self._stop.is_set():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

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

    async def flush(self) -> None:
        """Write the metered usage and the prediction log's buffers now."""
        await self.meter.flush()
        await self.predlog.flush()

    # ---- API --------------------------------------------------------------------

    def get(self, project_id: int, name: str) -> Live:
        live = self.live.get((project_id, name))
        if live is None:
            raise NotFoundError(f"deployment {name!r} not found", field="name")
        return live

    def of_project(self, project_id: int) -> list[Live]:
        return sorted(
            (d for (p, _), d in self.live.items() if p == project_id), key=lambda d: d.name
        )

    async def create(self, project: Project, body: dict[str, Any]) -> Live:
        name = check_name(body["name"], what="deployment name")
        async with self._lock:
            if (project.id, name) in self.live:
                raise ConflictError(f"deployment {name!r} already exists", field="name")
            routes = [{"version": body["version"], "weight": 100}]
            live = Live(
                project.id, name, body["model"], config=pick_config(body), project=project.name
            )
            resolved = await self._in_session(
                resolve_routes, project.id, live.model, routes, "version"
            )
            try:
                live.routes = await self._build_routes(live, resolved)
            except BaseException:
                self._evict_unused()  # what loaded before the failure
                raise
            live.state = DeploymentState.ready
            self._watch_drift(live)
            await self._in_session(
                save_deployment, project.id, name, live.model, resolved, live.config
            )
            self.live[(project.id, name)] = live
        return live

    async def update(self, project: Project, name: str, patch: dict[str, Any]) -> Live:
        """Swap the version, set canary routes, or change batching; atomically."""
        async with self._lock:
            live = self.get(project.id, name)
            config = {**live.config, **pick_config(patch)}
            version_field = None  # an unknown version is named as the caller wrote it
            if patch.get("routes") is not None:
                routes = patch["routes"]
            elif patch.get("version") is not None:
                routes = [{"version": patch["version"], "weight": 100}]
                version_field = "version"
            else:
                routes = [{"version": r.version, "weight": r.weight} for r in live.routes]
            resolved = await self._in_session(
                resolve_routes, project.id, live.model, routes, version_field
            )
            staged = Live(
                project.id,
                name,
                live.model,
                config=config,
                project=live.project,
                window=live.window,
            )
            try:
                new_routes = await self._build_routes(staged, resolved)  # loaded and warm
            except BaseException:
                self._evict_unused()
                raise
            old = live.routes
            live.routes, live.config = new_routes, config  # the switch
            live.state, live.error = DeploymentState.ready, None
            self._watch_drift(live)
            await self._in_session(save_deployment, project.id, name, live.model, resolved, config)
        await self._retire(live, old, kept={r.version for r in new_routes})
        return live

    async def delete(self, project: Project, name: str) -> None:
        async with self._lock:
            live = self.get(project.id, name)
            del self.live[(project.id, name)]
            await self._in_session(remove_deployment, project.id, name)
        await self._retire(live, live.routes, kept=set())

    async def predict(
        self, project_id: int, name: str, rows: Any, *, matrix: Any = None
    ) -> tuple[Output, int]:
        """Check ``rows`` (or an (N, F) ``matrix``) and predict; returns (output, version).

        The project's prediction quotas are checked first (QuotaError, 429). Every call
        on an existing deployment is recorded in its window with its HTTP-equivalent
        status; an answered one is metered, fed to drift and offered to the prediction
        log.
        """
        live = self.get(project_id, name)
        started = time.perf_counter()
        n = len(matrix) if matrix is not None else len(rows) if isinstance(rows, list) else 0
        status, version, reserved = 500, None, False
        meter = self.meter
        try:
            if self._ticker is None:
                self._start_ticker()
            if meter.needs_load(project_id):
                await meter.prepare(project_id)
            meter.reserve(project_id, n)
            reserved = True
            for _ in range(3):  # a route closed by a swap between pick and submit: pick again
                route = live.pick()
                version = route.version
                model = route.batcher.model
                frame = model.check_rows(rows) if matrix is None else model.check_matrix(matrix)
                try:
                    output = await route.batcher.predict(frame, live.config["timeout_ms"] / 1000)
                except Closed:
                    continue
                status = 200
                self.metrics.rows.labels(live.project, name, str(version)).inc(len(frame))
                meter.commit(project_id, name, n)
                if live.drift is not None:
                    live.drift.add(frame)
                self.predlog.offer(
                    live.project, name, version, rows if matrix is None else frame, output
                )
                return output, version
            raise ConflictError(f"deployment {name} is changing; try again", field="name")
        except KilnError as exc:
            status = exc.http_status
            raise
        except QueueFull:
            status = 503
            raise
        except DeadlineExceeded:
            status = 504
            raise
        except asyncio.CancelledError:
            status = 499  # the caller went away
            raise
        finally:
            if reserved and status != 200:
                meter.release(project_id, n)
            live.window.record(time.perf_counter() - started, status, n, version)

    # ---- monitoring -----------------------------------------------------------------

    def window(self, project_id: int, name: str, seconds: float = 60) -> dict[str, Any]:
        """The deployment's recent traffic: rates, latency percentiles, error share,
        batch sizes, queue depth and per-version counts over the last ``seconds``, and
        ``series``, one point per 5 s over the last 5 minutes, for live charts."""
        live = self.get(project_id, name)
        depth = sum(route.batcher.depth for route in live.routes)
        out = {"deployment": live.name, "model": live.model, "state": live.state.value}
        out.update(live.window.summary(seconds, queue_depth=depth))
        return out

    def drift(self, project_id: int, name: str) -> dict[str, Any]:
        """The drift report of the deployment's recent inputs (PSI per column, against
        the training data of its heaviest route's version); computes, may take
        milliseconds: call it off the event loop."""
        live = self.get(project_id, name)
        if live.drift is None:  # failed to load
            message = f"deployment {live.name} is {live.state.value}"
            report = no_drift(self.settings.drift_threshold, None, message)
        else:
            report = live.drift.report()
        return {"deployment": live.name, "model": live.model, **report}

    def _drift_reports(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """Every drift report, for a scrape (another thread: one failure skips one)."""
        for live in list(self.live.values()):
            if live.drift is None:
                continue
            try:
                yield live.project, live.name, live.drift.report()
            except Exception:
                log.exception("drift report of %s failed", live.name)

    def _watch_drift(self, live: Live) -> None:
        """(Re)start drift against the heaviest route's version, if that changed."""
        if not live.routes:
            live.drift = None
            return
        top = max(live.routes, key=lambda r: r.weight)
        if live.drift is not None and live.drift.version == top.version:
            return
        live.drift = DriftFeed(
            top.batcher.model.meta.reference or {},
            size=self.settings.drift_window,
            threshold=self.settings.drift_threshold,
            version=top.version,
        )

    def predictions(self, project_id: int, name: str, limit: int = 100) -> dict[str, Any]:
        """The newest ``limit`` records of the prediction log (blocking: a thread)."""
        live = self.get(project_id, name)
        items = self.predlog.read(live.project, live.name, limit)
        return {
            "deployment": live.name,
            "items": items,
            "limit": limit,
            **self.predlog.status(live.project, live.name),
        }

    # ---- internals ----------------------------------------------------------------

    async def _in_session(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(session, *args)`` in a transaction of its own, off the event loop."""

        def run() -> T:
            with self.db.session() as s:
                return fn(s, *args)

        return await asyncio.to_thread(run)

    async def _retire(self, live: Live, routes: list[Route], kept: set[int]) -> None:
        """Close ``routes`` (their batchers answer what they queued), forget the gauges of
        versions not ``kept``, empty the list, then evict the models nothing uses now.

        Eviction waits for ``_lock``: a change under way holds models it loaded but has
        not routed to yet. The list is emptied here, not by the caller, so no frame
        still refers to a closed batcher (and its model) when the collector runs.
        """
        while routes:
            route = routes.pop()
            await route.batcher.close()
            if route.version not in kept:
                self.metrics.forget(live.project, live.name, route.version)
            del route
        async with self._lock:
            self._evict_unused()

    def _evict_unused(self) -> None:
        """Drop every cached model that no route of a deployment uses (swapped out,
        deleted, or loaded by a change that failed), and its local copy of the bundle.
        The caller holds ``_lock`` and has closed the batchers of those routes."""
        used = {id(r.batcher.model) for live in self.live.values() for r in live.routes}
        gone = [key for key, model in self._models.items() if id(model) not in used]
        if not gone:
            return
        for key in gone:
            del self._models[key]
        still = {version_id for version_id, _ in self._models}
        for version_id in {version_id for version_id, _ in gone} - still:
            # decrypted bundle bytes: not left behind on disk either
            shutil.rmtree(self.cache_dir / version_id, ignore_errors=True)
        # ServedModel froze everything it loaded out of the cyclic collector's sight
        # (gc.freeze), so the evicted model's reference cycles would never be freed:
        # one full collection sees them, then what survives is frozen again.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    async def _build_routes(self, live: Live, resolved: list[dict[str, Any]]) -> list[Route]:
        routes = []
        for r in resolved:
            model = await self._load(r.get("id"), r.get("key"), live, r["version"])
            batcher = Batcher(
                model,
                max_batch_size=live.config["max_batch_size"],
                max_delay_ms=live.config["max_delay_ms"],
                max_queue=live.config["max_queue"],
                on_batch=self._recorder(live, r["version"]),
            )
            labels = (live.project, live.name, str(r["version"]))
            self.metrics.queue_depth.labels(*labels).set_function(_depth_of(batcher))
            routes.append(Route(r["version"], r["weight"], batcher))
        return routes

    async def _load(
        self, version_id: str | None, key: str | None, live: Live, number: int
    ) -> ServedModel:
        if version_id is None or key is None:  # a restored row: resolve it again
            resolved = await self._in_session(
                resolve_routes, live.project_id, live.model, [{"version": number, "weight": 1}]
            )
            version_id, key = resolved[0]["id"], resolved[0]["key"]
        backend = live.config["backend"]
        load_seconds = self.metrics.load_seconds.labels(live.project, live.name, str(number))
        cached = self._models.get((version_id, backend))
        if cached is not None:  # loaded for another deployment: its load time is this one's
            load_seconds.set(cached.load_seconds)
            return cached
        local = self.cache_dir / version_id
        try:
            if not local.is_dir():
                tmp = self.cache_dir / f".{version_id}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                await asyncio.to_thread(self.store.get_dir, key, tmp)
                tmp.rename(local)
            model = await asyncio.to_thread(ServedModel, local, backend)
        except BaseException:
            # no decrypted copy outlives a failed load (nor a half-fetched one)
            shutil.rmtree(self.cache_dir / f".{version_id}.tmp", ignore_errors=True)
            if not any(v == version_id for v, _ in self._models):  # another backend's
                shutil.rmtree(local, ignore_errors=True)
            raise
        load_seconds.set(model.load_seconds)
        self._models[(version_id, backend)] = model
        return model

    def _recorder(self, live: Live, version: int) -> Any:
        labels = (live.project, live.name, str(version))
        window = live.window

        def record(stats: BatchStats) -> None:
            window.record_batch(stats.rows)
            self.metrics.batch_size.labels(*labels).observe(stats.rows)
            self.metrics.model_time.labels(*labels).observe(stats.model_seconds)
            wait = self.metrics.queue_wait.labels(*labels)
            for seconds in stats.waits:
                wait.observe(seconds)

        return record


def _depth_of(batcher: Batcher) -> Any:
    return lambda: float(batcher.depth)
