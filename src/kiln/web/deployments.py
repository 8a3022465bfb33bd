"""Deployment pages: routes and weights, hot swap and canary forms, the live panel.

The forms call the same ``DeploymentManager.update`` as ``PATCH /api/v1/deployments``.
The live panel shows the serving window's statistics when the server keeps one
(:func:`window_stats`: ``manager.window(project_id, name)`` or ``live.stats``), and
otherwise what the Prometheus series of the deployment give (:func:`prometheus_stats`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypedDict

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from kiln.errors import ForbiddenError, KilnError, SpecError
from kiln.monitor.metrics import ServingMetrics
from kiln.serve.deployments import DeploymentChange, DeploymentManager, Live
from kiln.store import registry
from kiln.store.deployments import RouteSpec
from kiln.store.tables import ModelVersion
from kiln.web import charts
from kiln.web.auth import audit
from kiln.web.pages import PageRoute, Viewer, json_viewer, render, viewer
from kiln.web.views import FormDep, FormFields

router = APIRouter(route_class=PageRoute, include_in_schema=False)
api = APIRouter(include_in_schema=False)

ViewerDep = Annotated[Viewer, Depends(viewer)]
MAX_ROUTES = 8  # rows of the canary form


class NotServingError(KilnError):
    code = "unavailable"
    http_status = 503


def manager_of(request: Request) -> DeploymentManager | None:
    """The app's DeploymentManager (None before the app's lifespan started it)."""
    return getattr(request.app.state, "deployments", None)


def _plain(value: object) -> dict[str, object] | None:
    """The statistics as a mapping: their ``to_dict()``, ``snapshot()``, dataclass fields."""
    if value is None:
        return None
    to_dict, snapshot = getattr(value, "to_dict", None), getattr(value, "snapshot", None)
    if callable(to_dict):
        value = to_dict()
    elif callable(snapshot):
        value = snapshot()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        return None
    return {str(k): v for k, v in value.items()}


def window_stats(manager: DeploymentManager, live: Live) -> dict[str, object] | None:
    """The serving window's rolling statistics, where the server keeps them.

    The hook: ``manager.window(project_id, name)`` if the manager has that method,
    else ``live.stats`` (a mapping, a dataclass, or an object with ``to_dict()`` or
    ``snapshot()``; a method is called). None when neither exists yet.
    """
    window = getattr(manager, "window", None)
    stats = window(live.project_id, live.name) if callable(window) else getattr(live, "stats", None)
    if callable(stats) and not isinstance(stats, Mapping):
        stats = stats()
    return _plain(stats)


def _quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile`` over cumulative bucket counts (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower  # pragma: no cover - the last bucket holds every observation


class PrometheusStats(TypedDict):
    """A deployment's totals since the server started (None: nothing to measure yet)."""

    requests: int
    rows: int
    error_rate: float | None
    p50_ms: float | None
    p99_ms: float | None
    mean_batch_rows: float | None


def prometheus_stats(metrics: ServingMetrics, project: str, deployment: str) -> PrometheusStats:
    """Totals since the server started, from the Prometheus series of ``deployment`` in
    ``project``. Requests per second are left to the page, from two polls."""
    requests = errors = rows = batch_sum = batch_count = 0.0
    latency: dict[float, float] = {}
    registry_ = getattr(metrics, "registry", None)
    for family in registry_.collect() if registry_ is not None else []:
        for sample in family.samples:
            labels = sample.labels
            if labels.get("deployment") != deployment or labels.get("project") != project:
                continue
            if sample.name == "kiln_requests_total":
                requests += sample.value
                if not sample.labels.get("code", "").startswith("2"):
                    errors += sample.value
            elif sample.name == "kiln_rows_total":
                rows += sample.value
            elif sample.name == "kiln_request_seconds_bucket":
                le = float(sample.labels["le"])
                latency[le] = latency.get(le, 0.0) + sample.value
            elif sample.name == "kiln_batch_rows_sum":
                batch_sum += sample.value
            elif sample.name == "kiln_batch_rows_count":
                batch_count += sample.value
    p50, p99 = _quantile(0.5, latency), _quantile(0.99, latency)
    return {
        "requests": int(requests),
        "rows": int(rows),
        "error_rate": errors / requests if requests else None,
        "p50_ms": p50 * 1000 if p50 is not None else None,
        "p99_ms": p99 * 1000 if p99 is not None else None,
        "mean_batch_rows": batch_sum / batch_count if batch_count else None,
    }


TILES = (
    "requests_per_s",
    "rows_per_s",
    "p50_ms",
    "p99_ms",
    "error_rate",
    "mean_batch_rows",
    "queue_depth",
)


class LivePanel(TypedDict):
    """The deployment page's live panel (``live.json``; read by static/deployment.js)."""

    time: float  # epoch seconds of this poll
    state: str
    source: str  # where the figures come from: "last 60 s", "since the server started"
    stats: dict[str, object]  # each of TILES; None where unknown
    totals: PrometheusStats
    versions: dict[str, object]  # the window's counts per version; {} without a window
    traffic: charts.Figure | None


def live_panel(manager: DeploymentManager, live: Live) -> LivePanel:
    """The live panel: the window's recent figures when there is a window, else the
    Prometheus totals since start (requests/s then come from two polls, in the page)."""
    depth = sum(r.depth for r in live.routes)
    totals = prometheus_stats(manager.metrics, live.project, live.name)
    window = window_stats(manager, live)
    if window is not None:
        stats = {k: window.get(k) for k in TILES}
        stats["queue_depth"] = window.get("queue_depth", depth)
        seconds = window.get("seconds")
        source = f"last {seconds:g} s" if isinstance(seconds, int | float) else "recent"
        series = window.get("series")
        traffic = charts.traffic(series) if isinstance(series, list) else None
        counts = window.get("versions")
        versions = counts if isinstance(counts, dict) else {}
    else:
        stats = {k: totals.get(k) for k in TILES} | {"requests_per_s": None, "queue_depth": depth}
        source, traffic, versions = "since the server started", None, {}
    return {
        "time": time.time(),
        "state": live.state.value,
        "source": source,
        "stats": stats,
        "totals": totals,
        "versions": versions,
        "traffic": traffic,
    }


class DriftRow(TypedDict):
    """A column of the drift table: its PSI (None: no rows yet) and whether it is flagged."""

    column: str
    psi: float | None
    drifted: bool


class DriftTable(TypedDict):
    """The deployment page's drift section, from ``DeploymentManager.drift``."""

    rows: int  # recent input rows compared
    threshold: float  # a PSI above it flags the column
    version: int | None  # whose training data is the reference
    reference: bool  # False: nothing to compare with (``message`` says why)
    message: str | None
    columns: list[DriftRow]  # flagged first, then by PSI, highest first
    drifted: list[str]


def drift_rows(report: Mapping[str, Any]) -> DriftTable:
    """The drift report (``DeploymentManager.drift``'s answer: a
    :class:`~kiln.monitor.live.DriftReport` with the deployment's name) as the page's
    table: flagged columns first, then by PSI, highest first."""
    columns: list[DriftRow] = [
        {"column": name, "psi": c["psi"], "drifted": c["drifted"]}
        for name, c in report["columns"].items()
    ]
    columns.sort(key=lambda c: (not c["drifted"], -(c["psi"] or 0.0), c["column"]))
    return {
        "rows": report["rows"],
        "threshold": report["threshold"],
        "version": report["version"],
        "reference": report["reference"],
        "message": report.get("message"),
        "columns": columns,
        "drifted": sorted(report["drifted"]),
    }


@dataclasses.dataclass(frozen=True)
class EngineRow:
    """A generation route's engine right now (``GenerationEngine.stats()``): sequences
    decoding and waiting, KV-cache tokens in use against the budget (None: unbounded)."""

    version: int
    running: int
    waiting: int
    kv_tokens: int
    kv_budget: int | None


def engine_rows(live: Live) -> list[EngineRow]:
    """The engine statistics of every route serving a generation model (none for a
    classic or embedding deployment)."""
    from kiln.serve.lm import ServedLM

    rows = []
    for route in live.routes:
        if isinstance(route.served, ServedLM):
            stats = route.served.engine.stats()
            rows.append(
                EngineRow(
                    route.version, stats.running, stats.waiting, stats.kv_tokens, stats.kv_budget
                )
            )
    return rows


def served_version(live: Live) -> int | None:
    """The version taking the most traffic (the one a hot swap starts from)."""
    return max(live.routes, key=lambda r: r.weight).version if live.routes else None


# ---- pages -------------------------------------------------------------------------


@router.get("/deployments", name="web.deployments")
def deployments_page(request: Request, who: ViewerDep) -> Response:
    manager = manager_of(request)
    lives = manager.of_project(who.project.id) if manager is not None else []
    return render(request, "deployments.html", title="Deployments", deployments=lives)


def _versions(who: Viewer, model_name: str) -> list[ModelVersion]:
    with who.services.db.session() as s:
        try:
            model = registry.get_model(s, who.project, model_name)
        except KilnError:
            return []
        rows, _ = registry.list_versions(s, model, limit=500, offset=0)
        return rows


def _deployment_page(
    request: Request, who: Viewer, name: str, *, status: int = 200, error: str | None = None
) -> Response:
    manager = manager_of(request)
    if manager is None:
        raise NotServingError("serving is not running in this server")
    live = manager.get(who.project.id, name)
    return render(
        request,
        "deployment.html",
        status=status,
        title=f"Deployment {live.name}",
        live=live,
        versions=_versions(who, live.model),
        served=served_version(live),
        drift=drift_rows(manager.drift(who.project.id, name)),
        panel=live_panel(manager, live),
        engines=engine_rows(live),
        config=charts.CONFIG,
        max_routes=MAX_ROUTES,
        error=error,
    )


@router.get("/deployments/{name}", name="web.deployment")
def deployment_page(request: Request, name: str, who: ViewerDep) -> Response:
    return _deployment_page(request, who, name)


# response_model=None: the record is plain JSON already, sent as it is
@api.get("/deployments/{name}/live.json", name="web.deployment_live", response_model=None)
def deployment_live(
    request: Request, name: str, who: Annotated[Viewer, Depends(json_viewer)]
) -> LivePanel:
    """The deployment page's poll: the live panel's numbers."""
    manager = manager_of(request)
    if manager is None:
        raise NotServingError("serving is not running in this server")
    return live_panel(manager, manager.get(who.project.id, name))


def _routes_from(form: FormFields) -> list[RouteSpec]:
    """``version_<i>``/``weight_<i>`` rows; a blank version or a weight of 0 drops the row."""
    routes = []
    for i in range(MAX_ROUTES):
        version = str(form.get(f"version_{i}") or "").strip()
        weight_text = str(form.get(f"weight_{i}") or "").strip()
        if not version:
            continue
        try:
            weight = int(weight_text)
        except ValueError:
            raise SpecError(
                f"routes.{i}.weight: a whole number from 0 to 1000", field=f"routes.{i}.weight"
            ) from None
        if not 0 <= weight <= 1000:
            raise SpecError(
                f"routes.{i}.weight: a whole number from 0 to 1000", field=f"routes.{i}.weight"
            )
        if weight:
            routes.append(RouteSpec(_version_ref(version), weight))
    if not routes:
        raise SpecError("routes: give at least one version a weight above 0", field="routes")
    return routes


async def _update(
    request: Request,
    who: Viewer,
    name: str,
    patch_of: Callable[[FormFields], DeploymentChange],
    form: FormFields,
) -> Response:
    svc = who.services
    action = "web.deployments.update"
    target = f"deployment:{name}"
    try:
        if not who.can("deploy"):
            raise ForbiddenError("this key lacks the 'deploy' scope", field="scopes")
        manager = manager_of(request)
        if manager is None:
            raise NotServingError("serving is not running in this server")
        manager.get(who.project.id, name)  # 404 before reading the form's values
        await manager.update(who.project, name, patch_of(form))
    except KilnError as exc:
        await run_in_threadpool(
            audit, svc, who.principal, who.project.id, action, exc.code, exc.http_status, target
        )
        if exc.http_status in (404, 403, 503):
            raise
        return await run_in_threadpool(
            _deployment_page, request, who, name, status=exc.http_status, error=exc.message
        )
    await run_in_threadpool(audit, svc, who.principal, who.project.id, action, "ok", 303, target)
    return RedirectResponse(f"/deployments/{name}", status_code=303)


def _swap_patch(form: FormFields) -> DeploymentChange:
    version = str(form.get("version") or "").strip()
    if not version:
        raise SpecError("version: pick a version", field="version")
    return DeploymentChange(version=_version_ref(version))


def _version_ref(text: str) -> int | str:
    """A form's version: a number if it is one (ASCII digits; "²" is no number for int()),
    else an alias or ``latest``; longer numbers stay text and are simply not found."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else text


@router.post("/deployments/{name}/version", name="web.deployment_swap")
async def swap_version(request: Request, name: str, who: ViewerDep, form: FormDep) -> Response:
    """Hot swap: every request to ``version`` once it is loaded and warm."""
    return await _update(request, who, name, _swap_patch, form)


@router.post("/deployments/{name}/routes", name="web.deployment_routes")
async def set_routes(request: Request, name: str, who: ViewerDep, form: FormDep) -> Response:
    """Canary or rollback: the traffic weights of each version."""
    return await _update(
        request, who, name, lambda f: DeploymentChange(routes=_routes_from(f)), form
    )
