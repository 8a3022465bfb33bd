"""Usage and quotas: what a project consumed (scope ``read``), and its limits (set by a
global admin key only, since a project's admin must not lift its own). Rate limits are
quotas of kind ``requests_api`` / ``requests_inference`` per ``second`` or ``minute``
(``kiln.api.ratelimit``). A change applies on this server at once (its cached rate
limits and prediction quotas are read again); other servers sharing the database apply
it within 5 seconds (``kiln.api.ratelimit``, ``kiln.monitor.metering``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from kiln.api.deps import Admin, ProjectDep, Reader, ServicesDep, SessionDep
from kiln.errors import ForbiddenError, SpecError
from kiln.monitor import usage
from kiln.monitor.metering import KINDS as PREDICTION_KINDS
from kiln.store.projects import project_for

router = APIRouter(tags=["usage"])


class UsageItem(BaseModel):
    period: str = Field(description="2026-01-31 (day), 2026-01 (month) or total.")
    kind: str
    device: str = Field(
        description="cpu or cuda for compute_seconds and worker_seconds; empty otherwise."
    )
    quantity: float
    deployment: str | None = Field(
        default=None,
        description="With by=deployment: the deployment that served predictions or "
        "tokens (empty for other kinds).",
    )
    key: str | None = Field(
        default=None,
        description="With by=key: the API key id whose requests used the tokens (empty "
        "when none is known: a session, kiln serve's key, other kinds).",
    )


class QuotaOut(BaseModel):
    project: str
    kind: str
    period: str
    limit: float | None = Field(description="null once removed.")
    used: float = Field(
        description="Metered in the quota's current period (UTC); 0 for a rate limit."
    )


class UsageOut(BaseModel):
    project: str
    from_: datetime | None = Field(alias="from")
    to: datetime | None = Field(description="Exclusive.")
    group_by: str
    by: list[str] = Field(description="What the items are split by besides period and kind.")
    items: list[UsageItem]
    totals: dict[str, float] = Field(description="Per kind, over the whole range.")
    quotas: list[QuotaOut]


class QuotaIn(BaseModel):
    model_config = {"extra": "forbid"}

    project: str | None = Field(
        default=None, description="Default: ?project=, else the default project."
    )
    kind: str = Field(
        description=", ".join(usage.QUOTA_KINDS)
        + " (tokens: prompt + completion tokens); rate limits: "
        + ", ".join(usage.RATE_KINDS)
        + " (requests made with the project's keys)."
    )
    period: str = Field(
        default="day",
        description="day or month (UTC calendar), or total; second or minute for a rate limit.",
    )
    limit: float | None = Field(
        ge=0, description="null removes the quota; a rate limit is a whole number, 1 or more."
    )


@router.get("/usage", name="usage.summary")
def summary(
    _who: Reader,
    project: ProjectDep,
    s: SessionDep,
    from_: Annotated[
        str | None,
        Query(alias="from", description="ISO date or datetime (UTC unless it says otherwise)."),
    ] = None,
    to: Annotated[str | None, Query(description="Exclusive; ISO date or datetime.")] = None,
    group_by: Annotated[str, Query(description="day, month or total.")] = "day",
    by: Annotated[
        str,
        Query(description="Also split by deployment and/or key (comma-separated)."),
    ] = "",
) -> UsageOut:
    """The project's metered usage per period, kind and device (and deployment and/or
    API key with ``by``); totals; its quotas."""
    start, end = usage.parse_bound(from_, "from"), usage.parse_bound(to, "to")
    if start is not None and end is not None and end <= start:
        raise SpecError("to: must be later than from", field="to")
    split = [b.strip() for b in by.split(",") if b.strip()]
    result = usage.summary(s, project.id, start=start, end=end, group_by=group_by, by=split)
    return UsageOut(
        project=project.name,
        **{"from": start},
        to=end,
        group_by=group_by,
        by=split,
        items=[UsageItem(**item) for item in result["items"]],
        totals=result["totals"],
        quotas=[QuotaOut(project=project.name, **q) for q in usage.quotas(s, project.id)],
    )


@router.get("/quotas", name="quotas.list")
def list_(_who: Reader, project: ProjectDep, s: SessionDep) -> list[QuotaOut]:
    """The project's quotas and what is used of each in its current period."""
    return [QuotaOut(project=project.name, **q) for q in usage.quotas(s, project.id)]


@router.put("/quotas", name="quotas.set")
def set_(
    body: QuotaIn,
    who: Admin,
    s: SessionDep,
    svc: ServicesDep,
    request: Request,
    project: Annotated[str | None, Query(description="If the body names none.")] = None,
) -> QuotaOut:
    """Set a project's quota on one kind per period (``limit: null`` removes it), or its
    rate limit (``requests_inference`` 20 per ``second``)."""
    if not who.is_global_admin:
        raise ForbiddenError("only a global admin key sets quotas", field="scopes")
    row = project_for(s, who, body.project or project)
    request.state.project_id = row.id
    request.state.audit_target = f"quota:{row.name}/{body.kind}/{body.period}"
    usage.set_quota(s, row.id, body.kind, body.period, body.limit)
    manager = getattr(request.app.state, "deployments", None)
    if manager is not None and body.kind in PREDICTION_KINDS:
        # the serving path judges predictions on cached quotas: the next one reads them
        manager.monitor.meter.invalidate_on_commit(s, row.id)
    if body.kind in usage.RATE_KINDS:
        svc.rate.invalidate_on_commit(s)
        return QuotaOut(
            project=row.name, kind=body.kind, period=body.period, limit=body.limit, used=0.0
        )
    since = usage.period_start(body.period)
    return QuotaOut(
        project=row.name,
        kind=body.kind,
        period=body.period,
        limit=body.limit,
        used=usage.used(s, row.id, body.kind, since),
    )
