"""Usage metering: durable events per project, aggregated on demand, and quotas.

Kinds (units): ``compute_seconds`` (wall seconds a job's attempt ran, by device),
``worker_seconds`` (an attempt that trained on a Ray cluster: Σ over its Ray Train
workers of the seconds each trained, ``kiln.jobs.placement``), ``prediction_requests``
and ``prediction_rows`` (served), ``prompt_tokens`` and ``completion_tokens`` (the
language-model tokens of ``/v1`` requests, by deployment and API key; an embeddings
request's input counts as prompt tokens, as OpenAI's usage does), ``stored_bytes``
(datasets and model versions written to the artifact store). Events are only appended;
totals are sums over a time range. A quota caps one kind per ``day`` or ``month`` (UTC
calendar periods), or in ``total``; past it the call is refused with 429. The quota
kind ``tokens`` caps prompt + completion tokens together (``kiln.monitor.token_meter``
enforces it, mid-stream too).

Where each kind is written: ``compute_seconds`` when a job's attempt ends, whatever
its outcome (``kiln.jobs.resources``; an event's time is the attempt's end, so an
attempt that spans midnight counts for the day it ended), and ``worker_seconds``
with it for an attempt that ran on Ray; ``stored_bytes`` when a
dataset is stored and when a model version is registered (``kiln.store``; bytes
written, nothing is ever deleted); predictions by the serving side. Quotas are
enforced at the door: ``compute_seconds`` and ``worker_seconds`` when a job is submitted
(:func:`check_job_quotas`; the seconds of attempts still running count as used),
``stored_bytes`` when a dataset is uploaded or imported (before anything is stored); a
job that is already running is not stopped, and a version that training produced is
always registered.

Rate limits are quotas too: ``requests_api`` and ``requests_inference`` per ``second``
or ``minute`` cap the requests a project's keys make; they are enforced in memory by
``kiln.api.ratelimit`` (nothing is metered for them here, so their ``used`` is 0).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kiln.errors import QuotaError, SpecError
from kiln.lifecycle import JobState
from kiln.store.tables import Job, Quota, UsageEvent, utcnow

KINDS = (
    "compute_seconds",
    "worker_seconds",
    "prediction_requests",
    "prediction_rows",
    "prompt_tokens",
    "completion_tokens",
    "stored_bytes",
)
TOKEN_KINDS = ("prompt_tokens", "completion_tokens")
TOKENS = "tokens"
"""The quota kind that caps ``prompt_tokens`` + ``completion_tokens``."""
QUOTA_KINDS = (*KINDS, TOKENS)
SERVED_KINDS = ("prediction_requests", "prediction_rows", *TOKEN_KINDS)
"""Kinds whose ``subject`` is the deployment that served them."""
GROUPS = ("deployment", "key")
"""What :func:`summary` may split its items by, besides period, kind and device."""
PERIODS = ("day", "month", "total")
RATE_KINDS = ("requests_api", "requests_inference")
RATE_PERIODS = ("second", "minute")


def record(
    session: Session,
    project_id: int,
    kind: str,
    quantity: float,
    *,
    device: str = "",
    subject: str = "",
    key_id: str | None = None,
    time: datetime | None = None,
) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown usage kind {kind!r}")
    session.add(
        UsageEvent(
            project_id=project_id,
            kind=kind,
            quantity=float(quantity),
            device=device,
            subject=subject[:128],
            key_id=key_id,
            time=time or utcnow(),
        )
    )


def period_start(period: str, now: datetime | None = None) -> datetime | None:
    """The start of the current UTC day or month (None for ``total``)."""
    now = (now or utcnow()).astimezone(UTC)
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return None


def used(session: Session, project_id: int, kind: str, since: datetime | None) -> float:
    """The project's usage of ``kind`` since ``since`` (``tokens``: prompt + completion)."""
    kinds = TOKEN_KINDS if kind == TOKENS else (kind,)
    query = select(func.coalesce(func.sum(UsageEvent.quantity), 0.0)).where(
        UsageEvent.project_id == project_id, UsageEvent.kind.in_(kinds)
    )
    if since is not None:
        query = query.where(UsageEvent.time >= since)
    return float(session.scalar(query) or 0.0)


def check_quota(
    session: Session, project_id: int, kind: str, adding: float = 0.0, *, pending: float = 0.0
) -> None:
    """Raise QuotaError if ``adding`` more of ``kind`` would pass one of the project's quotas.

    ``pending`` counts usage this process has seen but not written yet.
    """
    quotas = session.scalars(
        select(Quota).where(Quota.project_id == project_id, Quota.kind == kind)
    ).all()
    for quota in quotas:
        so_far = used(session, project_id, kind, period_start(quota.period)) + pending
        # a request that is itself larger than what is left is refused; one that only
        # reaches the limit passes
        if so_far + adding > quota.limit or (adding == 0 and so_far >= quota.limit):
            per = "in total" if quota.period == "total" else f"per {quota.period}"
            running = f" ({number(pending)} of them still running)" if pending else ""
            needs = f", this needs {number(adding)} more" if adding else ""
            raise QuotaError(
                f"quota exceeded: {kind} {per} is {number(quota.limit)}; "
                f"{number(so_far)} used{running}{needs}",
                field=kind,
            )


def stored_bytes_check(session: Session, project_id: int) -> Callable[[int], None]:
    """A ``before_store`` hook for ``kiln.store.datasets``: refuses bytes past a quota."""

    def check(size: int) -> None:
        check_quota(session, project_id, "stored_bytes", float(size))

    return check


def number(value: float) -> str:
    """A quantity for a message: whole numbers without a decimal point or exponent."""
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def running_seconds(session: Session, project_id: int, kind: str = "compute_seconds") -> float:
    """Seconds, as of their last heartbeat, of the project's attempts still running (not
    metered until they end; see ``kiln.jobs.resources``): their wall seconds, or for
    ``worker_seconds`` their Ray workers' seconds."""
    rows = session.scalars(
        select(Job.resources).where(Job.project_id == project_id, Job.state == JobState.running)
    )
    running = [
        a
        for resources in rows
        for a in (resources or {}).get("attempts", [])
        if a.get("state") == "running"
    ]
    if kind == "worker_seconds":
        return sum(float((a.get("executor") or {}).get("worker_seconds", 0.0)) for a in running)
    return sum(float(a.get("wall_seconds", 0.0)) for a in running)


def check_job_quotas(session: Session, project_id: int) -> None:
    """Refuse a new job (QuotaError) when the project's compute or Ray worker seconds are
    used up, counting its attempts still running."""
    for kind in ("compute_seconds", "worker_seconds"):
        check_quota(session, project_id, kind, pending=running_seconds(session, project_id, kind))


def parse_bound(value: str | None, field: str) -> datetime | None:
    """A range bound: an ISO date (midnight UTC) or datetime (naive means UTC); 422 naming
    ``field`` otherwise."""
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SpecError(
            f"{field}: {value!r} is not an ISO date (2026-01-31) or datetime "
            "(2026-01-31T12:00:00Z)",
            field=field,
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def set_quota(
    session: Session, project_id: int, kind: str, period: str, limit: float | None
) -> None:
    """Set (or with ``limit=None`` remove) a project's quota or rate limit."""
    if kind in RATE_KINDS:
        if period not in RATE_PERIODS:
            raise SpecError(
                f"period: a rate limit ({kind}) is per {' or '.join(RATE_PERIODS)}",
                field="period",
            )
        if limit is not None and (limit < 1 or not float(limit).is_integer()):
            raise SpecError(
                "limit: a rate limit is a whole number of requests, 1 or more", field="limit"
            )
    elif kind not in QUOTA_KINDS:
        raise SpecError(f"kind must be one of {', '.join(QUOTA_KINDS + RATE_KINDS)}", field="kind")
    elif period not in PERIODS:
        raise SpecError(f"period must be one of {', '.join(PERIODS)}", field="period")
    row = session.scalar(
        select(Quota).where(
            Quota.project_id == project_id, Quota.kind == kind, Quota.period == period
        )
    )
    if limit is None:
        if row is not None:
            session.delete(row)
        return
    if limit < 0:
        raise SpecError("limit must be 0 or more", field="limit")
    if row is None:
        session.add(Quota(project_id=project_id, kind=kind, period=period, limit=limit))
    else:
        row.limit, row.updated_at = limit, utcnow()


def quotas(session: Session, project_id: int) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(Quota).where(Quota.project_id == project_id).order_by(Quota.kind, Quota.period)
    )
    out = []
    for q in rows:
        metered = q.kind not in RATE_KINDS
        out.append(
            {
                "kind": q.kind,
                "period": q.period,
                "limit": q.limit,
                "used": used(session, project_id, q.kind, period_start(q.period))
                if metered
                else 0.0,
            }
        )
    return out


def rate_quotas(session: Session) -> list[Quota]:
    """Every project's rate limits (a few rows; ``kiln.api.ratelimit`` caches them)."""
    return list(session.scalars(select(Quota).where(Quota.kind.in_(RATE_KINDS))))


def summary(
    session: Session,
    project_id: int,
    *,
    start: datetime | None,
    end: datetime | None,
    group_by: str,
    by: Sequence[str] = (),
) -> dict[str, Any]:
    """Sums per period (``day``, ``month`` or ``total``), kind and device, and overall totals.

    ``by`` splits the items further: ``deployment`` (the deployment that served
    predictions or tokens; empty for other kinds) and/or ``key`` (the API key id of
    token usage; empty when no key is known). Items then carry ``deployment`` and
    ``key``; without ``by`` they do not.
    """
    if group_by not in PERIODS:
        raise SpecError(f"group_by must be one of {', '.join(PERIODS)}", field="group_by")
    unknown = [b for b in by if b not in GROUPS]
    if unknown:
        raise SpecError(f"by: {', '.join(unknown)} is not one of {', '.join(GROUPS)}", field="by")
    query = select(
        UsageEvent.time,
        UsageEvent.kind,
        UsageEvent.device,
        UsageEvent.quantity,
        UsageEvent.subject,
        UsageEvent.key_id,
    ).where(UsageEvent.project_id == project_id)
    if start is not None:
        query = query.where(UsageEvent.time >= start)
    if end is not None:
        query = query.where(UsageEvent.time < end)
    buckets: dict[tuple[str, str, str, str, str], float] = defaultdict(float)
    totals: dict[str, float] = defaultdict(float)
    # summed in Python: one portable code path for SQLite and PostgreSQL date handling
    for time, kind, device, quantity, subject, key_id in session.execute(query):
        if group_by == "day":
            period = time.strftime("%Y-%m-%d")
        elif group_by == "month":
            period = time.strftime("%Y-%m")
        else:
            period = "total"
        served = kind in SERVED_KINDS
        deployment = subject if served and "deployment" in by else ""
        key = (key_id or "") if "key" in by else ""
        buckets[(period, kind, device, deployment, key)] += quantity
        totals[kind] += quantity
    items: list[dict[str, Any]] = []
    for (p, k, d, deployment, key), q in sorted(buckets.items()):
        item: dict[str, Any] = {"period": p, "kind": k, "device": d, "quantity": q}
        if by:
            item.update(deployment=deployment, key=key)
        items.append(item)
    return {"group_by": group_by, "items": items, "totals": dict(totals)}
