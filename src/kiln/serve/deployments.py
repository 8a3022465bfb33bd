"""Deployments: named endpoints over registered versions, with weighted routes.

The manager holds every deployment of the server in memory (its routes, each a
loaded model behind a batcher) and persists its definition in the database
(:mod:`kiln.store.deployments`), so a restarted server restores them. Changing the
routes (hot swap, canary, rollback) loads any new version beside the old ones, warms it
up, switches in one assignment, and only then closes the old batchers, which answer
what they already queued: no request fails because of a swap. A loaded model is cached
for as long as some deployment routes to it (two deployments of one version share it);
once a swap or a delete leaves it unused, nothing keeps it, in memory or on local disk.

A version of a generation or an embedding model (the task its manifest records) is
served by a :class:`~kiln.serve.lm.ServedLM` (its generation engine admits and
schedules requests: no batcher) or a :class:`~kiln.serve.lm.ServedEmbedder`; the
OpenAI-compatible routes reach them through :meth:`DeploymentManager.language_model`
and :meth:`DeploymentManager.embedder`, and predict refuses them (409). A retired
language model's engine closes in the background once the sequences it was decoding,
or had queued, have finished (:meth:`DeploymentManager.wait_retired`).

Every prediction is monitored by one :class:`~kiln.monitor.serving.DeploymentMonitor`,
which the manager asks to admit each request (quotas) and tells once how it ended:
each deployment's window of recent requests and batches (:meth:`DeploymentManager.window`),
its drift against the reference statistics of its main version
(:meth:`DeploymentManager.drift`), metering per project and the prediction log.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import InitVar, asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kiln.errors import ConflictError, KilnError, NotFoundError, SpecError
from kiln.lifecycle import DeploymentState
from kiln.lm_bundle_files import manifest_task
from kiln.monitor.live import DeploymentWindow
from kiln.monitor.metrics import ServingMetrics
from kiln.monitor.serving import Answer, DeploymentMonitor, DeploymentWatch, Served
from kiln.serve.batcher import Batcher, Closed
from kiln.serve.lm import ServedEmbedder, ServedLM
from kiln.serve.model import Output, ServedModel
from kiln.settings import Settings
from kiln.store.artifacts import ArtifactStore
from kiln.store.db import Database
from kiln.store.deployments import (
    CONFIG_FIELDS,
    Backend,
    DeploymentConfig,
    ResolvedRoute,
    RouteSpec,
    all_deployments,
    config_of,
    remove_deployment,
    resolve_routes,
    routes_of,
    save_deployment,
)
from kiln.store.projects import check_name
from kiln.store.tables import Project

log = logging.getLogger("kiln.serve")
T = TypeVar("T")

Loaded = ServedModel | ServedLM | ServedEmbedder
"""What serves one version: a classic model (behind a batcher), or a language model."""

ENDPOINTS = {
    "generation": "/v1/chat/completions or /v1/completions",
    "embedding": "/v1/embeddings",
}
"""Where requests to a language model go (the OpenAI-compatible routes), by task."""


def wrong_endpoint(name: str | None, task: str) -> str:
    """Why deployment ``name`` (None: unnamed), serving a ``task`` model, refuses a
    request, and where requests to it go."""
    article = "an" if task[:1] in "aeiou" else "a"
    where = ENDPOINTS.get(task, f"/api/v1/deployments/{name or '{name}'}/predict")
    who = f"deployment {name}" if name else "this deployment"
    return f"{who} serves {article} {task} model; use {where}"


class NewDeployment(BaseModel):
    """A deployment to create: its name, a model's version, and how to serve it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    model: str
    version: int | str = "latest"  # a number, ``latest`` or an alias
    config: DeploymentConfig = Field(default_factory=DeploymentConfig)


class DeploymentChange(BaseModel):
    """What an update changes; what is None stays.

    ``routes`` (canary, rollback) or ``version`` (hot swap: every request to it) set
    the routes; the other fields, the :class:`DeploymentConfig`'s, its settings.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int | str | None = None
    routes: list[RouteSpec] | None = None
    backend: Backend | None = None
    max_batch_size: int | None = None
    max_delay_ms: float | None = None
    max_queue: int | None = None
    timeout_ms: float | None = None

    def applied_to(self, config: DeploymentConfig) -> DeploymentConfig:
        """``config`` with the settings this change gives, validated as a whole."""
        changes = self.model_dump(include=set(CONFIG_FIELDS), exclude_none=True)
        return DeploymentConfig.model_validate({**config.model_dump(), **changes})


@dataclass
class Route:
    """A version a deployment routes to, its ``weight``, and what serves it: a classic
    model behind its ``queue`` (a :class:`Batcher`), or a language model (a ServedLM
    with its engine, or a ServedEmbedder) with no queue of the route's own."""

    version: int
    weight: int
    served: Loaded
    queue: Batcher | None = None

    @property
    def batcher(self) -> Batcher:
        """The classic model's batcher; a ConflictError (409) for a language model."""
        if self.queue is None:
            raise ConflictError(wrong_endpoint(None, self.served.meta.task), field="name")
        return self.queue

    @property
    def depth(self) -> int:
        """Requests waiting: for a batch, or for one of the engine's decoding slots."""
        if self.queue is not None:
            return self.queue.depth
        if isinstance(self.served, ServedLM):
            return self.served.engine.stats().waiting
        return 0

    @property
    def backend_name(self) -> str:
        return self.served.backend_name


@dataclass
class Live:
    """A deployment as the server holds it."""

    project_id: int
    name: str
    model: str
    routes: list[Route] = field(default_factory=list)
    state: DeploymentState = DeploymentState.loading
    error: str | None = None
    config: DeploymentConfig = field(default_factory=DeploymentConfig)
    project: str = ""  # the project's name (artifact keys)
    watch: DeploymentWatch = field(init=False)  # what the monitor keeps of it
    shared_watch: InitVar[DeploymentWatch | None] = None  # a staged change keeps the watch

    def __post_init__(self, shared_watch: DeploymentWatch | None) -> None:
        self.watch = (
            shared_watch if shared_watch is not None else DeploymentWatch(self.project, self.name)
        )

    @property
    def task(self) -> str | None:
        """The task of the model it serves (every route's); None while it has no routes."""
        return self.routes[0].served.meta.task if self.routes else None

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
        # (version id, backend); a language model's key also holds its engine's limits
        self._models: dict[tuple[str, str], Loaded] = {}
        self._closing: set[asyncio.Task[None]] = set()  # retired language models closing
        self._lock = asyncio.Lock()
        self.monitor = DeploymentMonitor(
            db,
            store,
            metrics,
            self.settings,
            watches=lambda: [live.watch for live in list(self.live.values())],
        )

    # ---- lifecycle ---------------------------------------------------------------

    async def restore(self) -> None:
        """Bring back every persisted deployment (a failure marks that one failed)."""
        self.monitor.start()
        rows = await self._in_session(all_deployments)
        for row, project in rows:
            live = Live(row.project_id, row.name, row.model, project=project)
            self.live[(row.project_id, row.name)] = live
            try:
                live.config = config_of(row)
                resolved = await self._in_session(
                    resolve_routes, row.project_id, row.model, routes_of(row)
                )
                live.routes = await self._build_routes(live, resolved)
                live.state = DeploymentState.ready
                self._follow_drift(live)
            except Exception as exc:
                live.state, live.error = DeploymentState.failed, str(exc)
                log.error("deployment %s could not be restored: %s", row.name, exc)

    def ready(self) -> bool:
        return all(d.state == DeploymentState.ready for d in self.live.values())

    async def close(self) -> None:
        """Close every batcher (they answer what they queued) and every language
        model (its engine finishes its sequences), then write the last metered usage
        and prediction log records."""
        for live in self.live.values():
            for route in live.routes:
                if route.queue is not None:
                    await route.queue.close()
        for model in list(self._models.values()):
            if not isinstance(model, ServedModel):
                await model.close()
        await self.wait_retired()
        self.live.clear()
        self._models.clear()
        # the decrypted copies of bundles live only while they are served
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        await self.monitor.close()

    async def flush(self) -> None:
        """Write the metered usage and the prediction log's buffers now."""
        await self.monitor.flush()

    async def wait_retired(self) -> None:
        """Until every retired language model has closed (its engine finished the
        sequences it had and its thread stopped)."""
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    # ---- API --------------------------------------------------------------------

    def get(self, project_id: int, name: str) -> Live:
        live = self.live.get((project_id, name))
        if live is None:
            raise NotFoundError(f"deployment {name!r} not found", field="name")
        return live

    def classic(self, project_id: int, name: str) -> Live:
        """The deployment, for predict and KServe v2: a ConflictError (409) naming the
        OpenAI-compatible route to use when it serves a language model."""
        live = self.get(project_id, name)
        task = live.task
        if task in ENDPOINTS:
            raise ConflictError(wrong_endpoint(name, task), field="name")
        return live

    def language_model(self, project_id: int, name: str) -> tuple[Live, Route, ServedLM]:
        """The deployment, the route picked for one request (by weight) and its
        generation model. NotFoundError for an unknown name; ConflictError (409) while
        it has no routes (loading, failed) or when it serves another kind of model.

        Submit to ``served.engine`` without an ``await`` in between: a route retired
        meanwhile closes its engine (``submit`` then raises QueueFull, a 503).
        """
        live = self.get(project_id, name)
        route = live.pick()
        if not isinstance(route.served, ServedLM):
            raise ConflictError(wrong_endpoint(name, route.served.meta.task), field="model")
        return live, route, route.served

    def embedder(self, project_id: int, name: str) -> tuple[Live, Route, ServedEmbedder]:
        """As :meth:`language_model`, for a deployment of an embedding model."""
        live = self.get(project_id, name)
        route = live.pick()
        if not isinstance(route.served, ServedEmbedder):
            raise ConflictError(wrong_endpoint(name, route.served.meta.task), field="model")
        return live, route, route.served

    def of_project(self, project_id: int) -> list[Live]:
        return sorted(
            (d for (p, _), d in self.live.items() if p == project_id), key=lambda d: d.name
        )

    async def create(self, project: Project, spec: NewDeployment) -> Live:
        """Load ``spec``'s version, warm it up and serve it (one route, weight 100)."""
        name = check_name(spec.name, what="deployment name")
        async with self._lock:
            if (project.id, name) in self.live:
                raise ConflictError(f"deployment {name!r} already exists", field="name")
            live = Live(project.id, name, spec.model, config=spec.config, project=project.name)
            resolved = await self._in_session(
                resolve_routes, project.id, live.model, [RouteSpec(spec.version, 100)], "version"
            )
            try:
                live.routes = await self._build_routes(live, resolved)
            except BaseException:
                self._evict_unused()  # what loaded before the failure
                raise
            live.state = DeploymentState.ready
            self._follow_drift(live)
            await self._in_session(
                save_deployment, project.id, name, live.model, resolved, live.config
            )
            self.live[(project.id, name)] = live
        return live

    async def update(self, project: Project, name: str, change: DeploymentChange) -> Live:
        """Swap the version, set canary routes, or change batching; atomically."""
        async with self._lock:
            live = self.get(project.id, name)
            config = change.applied_to(live.config)
            version_field = None  # an unknown version is named as the caller wrote it
            if change.routes is not None:
                routes = change.routes
            elif change.version is not None:
                routes = [RouteSpec(change.version, 100)]
                version_field = "version"
            else:
                routes = [RouteSpec(r.version, r.weight) for r in live.routes]
            resolved = await self._in_session(
                resolve_routes, project.id, live.model, routes, version_field
            )
            staged = Live(
                project.id,
                name,
                live.model,
                config=config,
                project=live.project,
                shared_watch=live.watch,
            )
            try:
                new_routes = await self._build_routes(staged, resolved)  # loaded and warm
            except BaseException:
                self._evict_unused()
                raise
            old = live.routes
            live.routes, live.config = new_routes, config  # the switch
            live.state, live.error = DeploymentState.ready, None
            self._follow_drift(live)
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
        self, project_id: int, name: str, rows: Any, *, matrix: np.ndarray | None = None
    ) -> tuple[Output, int]:
        """Check ``rows`` (or an (N, F) ``matrix``) and predict; returns (output, version).

        The project's prediction quotas are checked first (QuotaError, 429). Every call
        on an existing deployment is told to the monitor once, with its HTTP-equivalent
        status (see :meth:`DeploymentMonitor.observe`). A deployment of a language
        model refuses (ConflictError, 409: see :meth:`classic`).
        """
        live = self.classic(project_id, name)
        started = time.perf_counter()
        n = len(matrix) if matrix is not None else len(rows) if isinstance(rows, list) else 0
        status, version, admitted, answer = 500, None, False, None
        try:
            await self.monitor.admit(project_id, n)
            admitted = True
            for _ in range(3):  # a route closed by a swap between pick and submit: pick again
                route = live.pick()
                version = route.version
                model = route.batcher.model
                frame = model.check_rows(rows) if matrix is None else model.check_matrix(matrix)
                try:
                    output = await route.batcher.predict(frame, live.config.timeout_ms / 1000)
                except Closed:
                    continue
                status = 200
                answer = Answer(version, frame, rows if matrix is None else frame, output)
                return output, version
            raise ConflictError(f"deployment {name} is changing; try again", field="name")
        except KilnError as exc:  # QueueFull (503) and DeadlineExceeded (504) among them
            status = exc.http_status
            raise
        except asyncio.CancelledError:
            status = 499  # the caller went away
            raise
        finally:
            seconds = time.perf_counter() - started
            served = Served(project_id, n, seconds, status, version, admitted, answer)
            self.monitor.observe(live.watch, served)

    # ---- monitoring -----------------------------------------------------------------

    def window(self, project_id: int, name: str, seconds: float = 60) -> DeploymentWindow:
        """The deployment's recent traffic: rates, latency percentiles, error share,
        batch sizes, queue depth and per-version counts over the last ``seconds``, and
        ``series``, one point per 5 s over the last 5 minutes, for live charts."""
        live = self.get(project_id, name)
        depth = sum(route.depth for route in live.routes)
        summary = live.watch.window.summary(seconds, queue_depth=depth)
        return {
            "deployment": live.name,
            "model": live.model,
            "state": live.state.value,
            **summary,
        }

    def drift(self, project_id: int, name: str) -> dict[str, Any]:
        """The drift report of the deployment's recent inputs (PSI per column, against
        the training data of its heaviest route's version); computes, may take
        milliseconds: call it off the event loop."""
        live = self.get(project_id, name)
        report = self.monitor.drift(live.watch, f"deployment {live.name} is {live.state.value}")
        return {"deployment": live.name, "model": live.model, **report}

    def _follow_drift(self, live: Live) -> None:
        """Watch drift against the heaviest route's version."""
        if not live.routes:
            self.monitor.follow(live.watch, None, {})
            return
        top = max(live.routes, key=lambda r: r.weight)
        reference = top.served.meta.reference or {}
        self.monitor.follow(live.watch, top.version, reference)

    def predictions(self, project_id: int, name: str, limit: int = 100) -> dict[str, Any]:
        """The newest ``limit`` records of the prediction log (blocking: a thread)."""
        live = self.get(project_id, name)
        predlog = self.monitor.predlog
        items = predlog.read(live.project, live.name, limit)
        return {
            "deployment": live.name,
            "items": items,
            "limit": limit,
            **asdict(predlog.status(live.project, live.name)),
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
            if route.queue is not None:
                await route.queue.close()
            if route.version not in kept:
                self.metrics.forget(live.project, live.name, route.version)
            del route
        async with self._lock:
            self._evict_unused()

    def _evict_unused(self) -> None:
        """Drop every cached model that no route of a deployment uses (swapped out,
        deleted, or loaded by a change that failed), and its local copy of the bundle.
        The caller holds ``_lock`` and has closed the batchers of those routes; a
        language model's engine closes in the background (:meth:`wait_retired`)."""
        used = {id(r.served) for live in self.live.values() for r in live.routes}
        gone = [key for key, model in self._models.items() if id(model) not in used]
        if not gone:
            return
        for key in gone:
            model = self._models.pop(key)
            if not isinstance(model, ServedModel):
                self._close_later(model)
            del model
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

    def _close_later(self, model: ServedLM | ServedEmbedder) -> None:
        """Close a retired language model in the background: its engine finishes the
        sequences it is decoding and those it queued first (:meth:`wait_retired`)."""
        task = asyncio.get_running_loop().create_task(_close_retired(model))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _build_routes(self, live: Live, resolved: list[ResolvedRoute]) -> list[Route]:
        """Every route's model loaded and warm (all of one kind: a SpecError naming
        ``routes`` otherwise); classic models behind a new batcher each."""
        models = [await self._load(r, live) for r in resolved]
        if len({_kind(model) for model in models}) > 1:
            raise SpecError(
                "routes: every version of a deployment must be of one task "
                f"(got {', '.join(sorted({m.meta.task for m in models}))})",
                field="routes",
            )
        routes = []
        for r, model in zip(resolved, models, strict=True):
            route = Route(r.version, r.weight, model)
            if isinstance(model, ServedModel):
                route.queue = Batcher(
                    model,
                    max_batch_size=live.config.max_batch_size,
                    max_delay_ms=live.config.max_delay_ms,
                    max_queue=live.config.max_queue,
                    on_batch=self.monitor.batches(live.watch, r.version),
                )
            labels = (live.project, live.name, str(r.version))
            self.metrics.queue_depth.labels(*labels).set_function(_depth_of(route))
            routes.append(route)
        return routes

    async def _load(self, route: ResolvedRoute, live: Live) -> Loaded:
        """The route's version loaded (or the one already loaded for another route),
        by the task its manifest records: generation -> ServedLM (max_batch_size as
        its max_num_seqs, max_queue as its queue bound), embedding -> ServedEmbedder,
        else ServedModel."""
        version_id, backend = route.version_id, live.config.backend
        labels = (live.project, live.name, str(route.version))
        load_seconds = self.metrics.load_seconds.labels(*labels)
        # a generation model's engine is built for the deployment's limits
        config = live.config
        engine_key = f"{backend} max_num_seqs={config.max_batch_size} max_queue={config.max_queue}"
        for key in ((version_id, backend), (version_id, engine_key)):
            cached = self._models.get(key)
            if cached is not None:  # loaded for another deployment: its load time is this one's
                load_seconds.set(cached.load_seconds)
                return cached
        local = self.cache_dir / version_id
        try:
            if not local.is_dir():
                tmp = self.cache_dir / f".{version_id}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                await asyncio.to_thread(self.store.get_dir, route.key, tmp)
                tmp.rename(local)
            task = manifest_task(local)
            key = (version_id, engine_key if task == "generation" else backend)
            model: Loaded
            if task == "generation":
                model = await asyncio.to_thread(
                    partial(
                        ServedLM,
                        local,
                        max_num_seqs=config.max_batch_size,
                        max_queue=config.max_queue,
                        backend=backend,
                    )
                )
            elif task == "embedding":
                model = await asyncio.to_thread(partial(ServedEmbedder, local, backend=backend))
            else:
                model = await asyncio.to_thread(ServedModel, local, backend)
        except BaseException:
            # no decrypted copy outlives a failed load (nor a half-fetched one)
            shutil.rmtree(self.cache_dir / f".{version_id}.tmp", ignore_errors=True)
            if not any(v == version_id for v, _ in self._models):  # another backend's
                shutil.rmtree(local, ignore_errors=True)
            raise
        load_seconds.set(model.load_seconds)
        self._models[key] = model
        return model


def _depth_of(route: Route) -> Callable[[], float]:
    return lambda: float(route.depth)


def _kind(model: Loaded) -> str:
    """What a model answers: rows (predict, KServe v2), text, or embeddings."""
    return "rows" if isinstance(model, ServedModel) else model.meta.task


async def _close_retired(model: ServedLM | ServedEmbedder) -> None:
    """Close a retired language model, then free its memory (see ``_evict_unused``)."""
    try:
        await model.close()
    except Exception:  # a failed engine must not stop the others closing
        log.exception("closing a retired %s model failed", model.meta.task)
    del model
    gc.unfreeze()
    gc.collect()
    gc.freeze()
