"""Dashboard pages: jobs (with live curves), models and lineage, datasets, usage, audit.

Every page is scoped to the signed-in project: a resource of another project answers
the same 404 page as one that does not exist. Pages are thin: one query, one template.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypedDict

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from kiln.api.schemas import job_out, model_out
from kiln.errors import ForbiddenError, KilnError
from kiln.jobs import queue
from kiln.lifecycle import FINAL_STATES, JobState
from kiln.manifest import JSONDocument
from kiln.serve.openai_finetune import OPTION as FINE_TUNE_OPTION
from kiln.serve.openai_finetune import FineTuneRecord
from kiln.store import datasets, registry
from kiln.store.db import MAX_OFFSET
from kiln.store.tables import AuditEvent, Dataset, Job, JobLog, Model, ModelVersion
from kiln.web import charts, results
from kiln.web.auth import audit
from kiln.web.pages import PageRoute, Viewer, json_viewer, render, viewer, web_state
from kiln.web.session import CSRF_FIELD, check_csrf

router = APIRouter(route_class=PageRoute, include_in_schema=False)
api = APIRouter(include_in_schema=False)

ViewerDep = Annotated[Viewer, Depends(viewer)]
JsonViewerDep = Annotated[Viewer, Depends(json_viewer)]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
PAGE = 50
LOG_LINES = 1000


FormFields = dict[str, str | UploadFile]
"""A POST form's fields, less its CSRF token: text, or an uploaded file."""


async def checked_form(request: Request, who: ViewerDep) -> FormFields:
    """``Depends``: a POST form whose CSRF token matches the session's (else 403)."""
    form = await request.form()
    check_csrf(who.session.csrf, form.get(CSRF_FIELD))
    return {k: v for k, v in form.items() if k != CSRF_FIELD}


FormDep = Annotated[FormFields, Depends(checked_form)]


def pager(offset: int, count: int, total: int) -> dict[str, int | None]:
    return {
        "offset": offset,
        "total": total,
        "prev": max(0, offset - PAGE) if offset > 0 else None,
        "next": offset + count if offset + count < total else None,
    }


# ---- jobs --------------------------------------------------------------------------


@router.get("/jobs", name="web.jobs")
def jobs_page(
    request: Request, who: ViewerDep, offset: Offset = 0, state: JobState | None = None
) -> Response:
    with who.services.db.session() as s:
        rows, total = queue.list_jobs(
            s, who.project, state=state.value if state else None, limit=PAGE, offset=offset
        )
        jobs = [job_out(s, r) for r in rows]
    return render(
        request,
        "jobs.html",
        title="Jobs",
        jobs=[
            (
                job,
                job_name(job.spec, job.result),
                results.versions_of(job.result),
                results.progress_bar(job.state, job.progress),
                fine_tune_of(job.options),
            )
            for job in jobs
        ],
        state=state.value if state else None,
        states=[value.value for value in JobState],
        page=pager(offset, len(jobs), total),
    )


def fine_tune_of(options: JSONDocument) -> FineTuneRecord | None:
    """The OpenAI fine-tuning record of a job made through ``/v1/fine_tuning/jobs``
    (``Job.options["openai"]``); None for any other job, or a record of another shape."""
    from pydantic import ValidationError

    raw = options.get(FINE_TUNE_OPTION)
    if not isinstance(raw, dict):
        return None
    try:
        return FineTuneRecord.model_validate(raw)
    except ValidationError:
        return None


def job_name(spec: JSONDocument, result: JSONDocument) -> str | None:
    """What a job is about: its spec's ``name``, else the model its result names (a
    compress spec names no model of its own)."""
    for name in (spec.get("name"), result.get("model")):
        if isinstance(name, str) and name:
            return name
    return None


def dataset_of(spec: JSONDocument) -> str | None:
    """The dataset id a job's spec reads, if it names one."""
    data = spec.get("data")
    source = data.get("source") if isinstance(data, dict) else data
    return datasets.dataset_ref(source) if isinstance(source, str) else None


class LogLine(TypedDict):
    """A job log line as the job page shows it (``time`` as ``HH:MM:SS``)."""

    id: int
    attempt: int
    level: str
    message: str
    time: str


class Curves(TypedDict):
    loss: charts.Figure
    validation: charts.Figure


class ProgressBar(TypedDict):
    """The progress bar: ``value`` of ``max``, and its text (see results.progress_bar)."""

    value: int
    max: int
    text: str


class JobLive(TypedDict):
    """What the job page shows and polls (``live.json``; read by static/kiln.js, which
    reloads the page's ``data-live-swap`` parts once ``finished``)."""

    id: str
    state: str
    finished: bool
    cancel_requested: bool
    progress: dict[str, int]  # kiln.jobs.queue.Progress: epoch/epochs, fold/folds
    bar: ProgressBar
    error: str | None
    points: int  # epochs recorded so far
    figures: Curves
    logs: list[LogLine]  # those after the poll's ``after`` id


def _log(row: JobLog) -> LogLine:
    return {
        "id": row.id,
        "attempt": row.attempt,
        "level": row.level,
        "message": row.message,
        "time": row.time.strftime("%H:%M:%S"),
    }


def job_state(s: Session, who: Viewer, job_id: str, after: int) -> JobLive:
    """What the job page shows and polls: state, progress, curves, new log lines."""
    job = queue.get_job(s, who.project, job_id)
    epochs = queue.epoch_series(s, job.id)
    bar = results.progress_bar(job.state, job.progress or {})
    return {
        "id": job.id,
        "state": job.state,
        "finished": job.state in FINAL_STATES,
        "cancel_requested": job.cancel_requested,
        "progress": job.progress or {},
        "bar": {"value": bar.value, "max": bar.max, "text": bar.text},
        "error": (job.error or {}).get("message"),
        "points": len(epochs),
        "figures": {
            "loss": charts.loss_curves(epochs),
            "validation": charts.validation_curves(epochs),
        },
        "logs": [_log(r) for r in queue.job_logs(s, job.id, after=after, limit=LOG_LINES)],
    }


@router.get("/jobs/{job_id}", name="web.job")
def job_page(request: Request, job_id: str, who: ViewerDep) -> Response:
    with who.services.db.session() as s:
        out = job_out(s, queue.get_job(s, who.project, job_id))
        live = job_state(s, who, job_id, after=0)
    return render(
        request,
        "job.html",
        title=f"Job {out.id}",
        job=out,
        live=live,
        dataset_id=dataset_of(out.spec),
        outcome=results.result_view(out.kind, out.result),
        resources=results.resource_facts(out.resources),
        fine_tune=fine_tune_of(out.options),
        config=charts.CONFIG,
    )


# response_model=None: the record is plain JSON already, sent as it is
@api.get("/jobs/{job_id}/live.json", name="web.job_live", response_model=None)
def job_live(job_id: str, who: JsonViewerDep, after: Offset = 0) -> JobLive:
    """The job page's poll (every second while the job runs)."""
    with who.services.db.session() as s:
        return job_state(s, who, job_id, after)


@router.post("/jobs/{job_id}/cancel", name="web.job_cancel")
def cancel_job(job_id: str, who: ViewerDep, _form: FormDep) -> Response:
    svc = who.services
    try:
        if not who.can("train"):
            raise ForbiddenError("this key lacks the 'train' scope", field="scopes")
        with svc.db.session() as s:
            queue.request_cancel(s, queue.get_job(s, who.project, job_id))
    except KilnError as exc:
        audit(svc, who.principal, who.project.id, "web.jobs.cancel", exc.code, exc.http_status)
        raise
    audit(svc, who.principal, who.project.id, "web.jobs.cancel", "ok", 303, f"job:{job_id}")
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


# ---- models ------------------------------------------------------------------------


@router.get("/models", name="web.models")
def models_page(request: Request, who: ViewerDep, offset: Offset = 0) -> Response:
    with who.services.db.session() as s:
        rows, total = registry.list_models(s, who.project, limit=PAGE, offset=offset)
        models = [model_out(s, m) for m in rows]
    return render(
        request,
        "models.html",
        title="Models",
        models=models,
        page=pager(offset, len(models), total),
    )


def headline(version: ModelVersion) -> tuple[str, Any]:
    from kiln.evaluate.metrics import headline_metric

    name = headline_metric(version.task)
    test = version.metrics.get("test") if isinstance(version.metrics, dict) else None
    return name, test.get(name) if isinstance(test, dict) else None


def pareto_figure(versions: list[ModelVersion]) -> charts.Figure | None:
    """The compression trade-off of a model's variants (versions with a report)."""
    from kiln.compress.report import pareto_front
    from kiln.spec.spec import metric_mode

    points: list[charts.ParetoPoint] = []
    for v in sorted(versions, key=lambda v: v.version):
        report = v.summary.get("report") if isinstance(v.summary, dict) else None
        try:
            metric = report["metric"]  # type: ignore[index]
            score = _number(metric["test"])
            if score is None:
                continue
            points.append(
                {
                    "metric_name": str(metric["name"]),
                    "label": f"v{v.version} {v.summary.get('variant') or ''}".strip(),
                    "bytes": _number(report.get("model_bytes")),  # type: ignore[union-attr]
                    "p50_ms": _number(report["latency"]["batch1_p50_ms"]),  # type: ignore[index]
                    "metric": score,
                    "source_metric": _number(metric.get("source_test")),
                    "front_size": False,
                    "front_latency": False,
                }
            )
        except (KeyError, TypeError, ValueError):
            continue  # not a compressed variant, or a report of another shape
    if not points:
        return None
    names: list[str] = [p["metric_name"] for p in points]
    metric_name = max(set(names), key=names.count)
    points = [p for p in points if p["metric_name"] == metric_name]
    higher = metric_mode(metric_name) == "max"
    for cost, flag in charts.PARETO_COSTS:
        known = [(p, c) for p in points if (c := p[cost]) is not None]
        front = pareto_front([(c, p["metric"]) for p, c in known], higher)
        for (p, _), on in zip(known, front, strict=True):
            p[flag] = on
    return charts.pareto(points, metric_name, higher)


def _number(value: Any) -> float | None:
    """A finite number, or None (NaN and infinities do not survive JSON)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class LineageNode(TypedDict):
    """A version in the model page's lineage tree, with the variants compressed from it."""

    version: ModelVersion
    root: bool  # a trained version (no parent among the model's versions)
    headline: tuple[str, Any]
    children: list[LineageNode]


def lineage_tree(versions: list[ModelVersion]) -> list[LineageNode]:
    """Versions as trees: a root (trained) version and the variants compressed from it."""
    by_id = {v.id: v for v in versions}
    children: dict[str, list[ModelVersion]] = {}
    for v in versions:
        if v.parent_id in by_id:
            children.setdefault(v.parent_id, []).append(v)

    def node(v: ModelVersion, depth: int) -> LineageNode:
        kids = sorted(children.get(v.id, []), key=lambda c: c.version)
        return {
            "version": v,
            "root": depth == 0,
            "headline": headline(v),
            "children": [node(c, depth + 1) for c in kids] if depth < 50 else [],
        }

    roots = [v for v in versions if v.parent_id not in by_id]
    return [node(v, 0) for v in sorted(roots, key=lambda v: v.version)]


@router.get("/models/{name}", name="web.model")
def model_page(request: Request, name: str, who: ViewerDep) -> Response:
    with who.services.db.session() as s:
        model = registry.get_model(s, who.project, name)
        versions, _ = registry.list_versions(s, model, limit=500, offset=0)
        aliases = registry.aliases_of(s, model)
    by_id = {v.id: v.version for v in versions}
    return render(
        request,
        "model.html",
        title=f"Model {model.name}",
        model=model,
        versions=[(v, headline(v), by_id.get(v.parent_id or "")) for v in versions],
        aliases=aliases,
        tree=lineage_tree(versions),
        pareto=pareto_figure(versions),
        config=charts.CONFIG,
    )


def flatten(values: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``("test.accuracy", 0.93)`` rows; lists stay whole."""
    if not isinstance(values, dict):
        return [(prefix, values)]
    rows: list[tuple[str, Any]] = []
    for key, value in values.items():
        rows.extend(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return rows


@router.get("/models/{name}/versions/{version}", name="web.version")
def version_page(request: Request, name: str, version: str, who: ViewerDep) -> Response:
    with who.services.db.session() as s:
        model = registry.get_model(s, who.project, name)
        row = registry.resolve_version(s, model, version)
        versions, _ = registry.list_versions(s, model, limit=500, offset=0)
        by_id = {v.id: v for v in versions}
        ancestors: list[ModelVersion] = []
        cursor = row
        while cursor.parent_id in by_id and len(ancestors) < 50:
            cursor = by_id[cursor.parent_id]
            ancestors.insert(0, cursor)
        root = ancestors[0] if ancestors else row
        dataset = s.get(Dataset, root.dataset_id) if root.dataset_id else None
        if dataset is not None and dataset.project_id != who.project.id:
            dataset = None
        job = s.get(Job, root.job_id) if root.job_id else None
        if job is not None and job.project_id != who.project.id:
            job = None
        aliases = [a for a, n in registry.aliases_of(s, model).items() if n == row.version]
    tree = [t for t in lineage_tree(versions) if t["version"].id == root.id]
    return render(
        request,
        "version.html",
        title=f"{model.name} v{row.version}",
        model=model,
        version=row,
        aliases=aliases,
        ancestors=ancestors,
        dataset=dataset,
        job=job,
        tree=tree,
        metrics=flatten(row.metrics),
        summary=[
            (k, v)
            for k, v in flatten(row.summary)
            if not k.startswith("report.") and k != "importance"
        ],
        report=flatten(row.summary.get("report")) if row.summary.get("report") else [],
        importance=importance_figure(row.summary.get("importance")),
        config=charts.CONFIG,
    )


def importance_figure(value: Any) -> charts.Figure | None:
    """A gbdt version's feature importances (``summary.importance``: [name, gain]
    pairs) as a bar chart; None when the version has none."""
    if not isinstance(value, list):
        return None
    gains: list[tuple[str, float]] = []
    for pair in value:
        if isinstance(pair, list | tuple) and len(pair) == 2:
            gain = _number(pair[1])
            if gain is not None:
                gains.append((str(pair[0]), gain))
    return charts.importance(gains) if gains else None


# ---- datasets ----------------------------------------------------------------------


@router.get("/datasets", name="web.datasets")
def datasets_page(request: Request, who: ViewerDep, offset: Offset = 0) -> Response:
    with who.services.db.session() as s:
        rows, total = datasets.list_datasets(s, who.project, limit=PAGE, offset=offset)
    return render(
        request,
        "datasets.html",
        title="Datasets",
        datasets=rows,
        page=pager(offset, len(rows), total),
    )


@router.get("/datasets/{dataset_id}", name="web.dataset")
def dataset_page(request: Request, dataset_id: str, who: ViewerDep) -> Response:
    svc = who.services
    with svc.db.session() as s:
        row = datasets.get_dataset(s, who.project, dataset_id)
        trained = s.execute(
            select(Model.name, ModelVersion.version)
            .join(Model, Model.id == ModelVersion.model_id)
            .where(ModelVersion.dataset_id == row.id, Model.project_id == who.project.id)
            .order_by(Model.name, ModelVersion.version)
        ).all()
    error = None
    try:
        stats = web_state(request).profiles.get(svc.store, row)
    except KilnError as exc:
        stats, error = None, exc.message
    return render(
        request,
        "dataset.html",
        title=f"Dataset {row.name}",
        dataset=row,
        stats={c["name"]: c for c in stats} if stats is not None else None,
        stats_error=error,
        trained=trained,
    )


# ---- usage and audit ---------------------------------------------------------------

USAGE_DAYS = 30


@router.get("/usage", name="web.usage")
def usage_page(request: Request, who: ViewerDep) -> Response:
    from kiln.monitor.units import amount
    from kiln.monitor.usage import RATE_KINDS, quotas, summary

    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = today - timedelta(days=USAGE_DAYS - 1)
    days = [(start + timedelta(days=i)).strftime("%Y-%m-%d") for i in range(USAGE_DAYS)]
    with who.services.db.session() as s:
        recent = summary(s, who.project.id, start=start, end=None, group_by="day")
        per_day = summary(
            s, who.project.id, start=start, end=None, group_by="day", by=("deployment",)
        )
        limits = quotas(s, who.project.id)
    tokens = charts.tokens_by_deployment(per_day, days)
    return render(
        request,
        "usage.html",
        title="Usage",
        totals=[(kind, q, amount(kind, q)) for kind, q in sorted(recent["totals"].items())],
        quotas=[
            {
                **q,
                "used_text": "-" if q["kind"] in RATE_KINDS else amount(q["kind"], q["used"]),
                "limit_text": amount(q["kind"], q["limit"]),
            }
            for q in limits
        ],
        figures=charts.usage(recent, days),
        token_rows=_token_rows(per_day["items"]),
        token_figure=tokens,
        days=USAGE_DAYS,
        config=charts.CONFIG,
    )


class TokenRow(TypedDict):
    """One deployment's language-model tokens on the usage page."""

    deployment: str
    prompt: str
    completion: str


def _token_rows(items: list[dict[str, Any]]) -> list[TokenRow]:
    """Per deployment (usage items split by deployment): prompt and completion tokens."""
    from kiln.monitor.units import count

    totals: dict[str, list[float]] = {}
    for item in items:
        if item["kind"] in charts.TOKEN_KINDS:
            pair = totals.setdefault(item["deployment"], [0.0, 0.0])
            pair[charts.TOKEN_KINDS.index(item["kind"])] += item["quantity"]
    return [
        {"deployment": name, "prompt": count(prompt), "completion": count(completion)}
        for name, (prompt, completion) in sorted(totals.items())
    ]


@router.get("/audit", name="web.audit")
def audit_page(request: Request, who: ViewerDep, offset: Offset = 0) -> Response:
    """The project's audit log, newest first (admin keys only)."""
    if not who.can("admin"):
        raise ForbiddenError("the audit log needs an admin key", field="scopes")
    where = AuditEvent.project_id == who.project.id
    with who.services.db.session() as s:
        total = s.scalar(select(func.count()).select_from(AuditEvent).where(where)) or 0
        rows = list(
            s.scalars(
                select(AuditEvent)
                .where(where)
                .order_by(AuditEvent.id.desc())
                .limit(PAGE)
                .offset(offset)
            )
        )
    return render(
        request, "audit.html", title="Audit log", events=rows, page=pager(offset, len(rows), total)
    )
