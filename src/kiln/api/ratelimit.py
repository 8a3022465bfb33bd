"""Rate limits: requests per second or minute, per API key and per project, counted
separately on inference and on the management API.

Lanes: ``inference`` is predict, v2 infer and the OpenAI routes under ``/v1``
(:data:`INFERENCE_ROUTES`); ``api`` is every other route under ``/api/v1``, ``/v2`` and
``/v1`` but the v2 health routes (which need no key). ``/metrics``, ``/healthz`` and the
dashboard are not limited.

- Per key: ``KILN_RATE_LIMIT_API`` and ``KILN_RATE_LIMIT_INFERENCE`` (on by default; one
  or more limits in the ``limits`` notation, ``20/second;600/minute``, or ``off``).
- Per project: a global admin sets ``requests_api`` / ``requests_inference`` quotas per
  ``second`` or ``minute`` (``kiln quotas set inference --rps 20 --project acme``). They
  count the requests made with the project's keys; a global key acting on a project is
  not counted against it.

Past a limit the request is refused with :class:`~kiln.errors.RateLimitError` (429, a
``Retry-After`` in whole seconds, the limit named in the message and in ``field``:
``rate_limit.key`` or ``rate_limit.project``) before the route runs; refused requests
use up nothing. Counters live in this process's memory: the ``limits`` library's moving
window, which is exact (never more than the limit in any span of the window's length, so
no burst of twice the limit across a window edge, as a fixed window allows, and none of
the approximation of a sliding-window counter) for one timestamp per request in the
window. Each server of a cluster counts on its own.

The serving path is hot, so a check reads no database: a hit costs a few microseconds.
The projects' limits are read once every ``ttl`` seconds (in a thread), and again at the
next request after this server changed them (:meth:`RateLimits.invalidate_on_commit`);
other servers sharing the database see a change within ``ttl`` seconds.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import NoReturn

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import event
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from kiln.errors import RateLimitError
from kiln.monitor.usage import RATE_KINDS, rate_quotas
from kiln.store.db import Database
from kiln.store.keys import Principal

INFERENCE_ROUTES = frozenset(
    {"deployments.predict", "v2.infer", "openai.chat", "openai.completions", "openai.embeddings"}
)
UNLIMITED_ROUTES = frozenset({"v2.live", "v2.ready"})
LIMITED_PREFIXES = ("/api/v1/", "/v2/", "/v1/")
KIND_OF_LANE = {"api": "requests_api", "inference": "requests_inference"}
"""The quota kind that holds a project's limits of each lane."""
SETTING_OF_LANE = {"api": "KILN_RATE_LIMIT_API", "inference": "KILN_RATE_LIMIT_INFERENCE"}
WORDS = {"api": "management API requests", "inference": "inference requests"}

ProjectLimits = dict[int, dict[str, list[RateLimitItem]]]
"""Project id → lane → its limits."""


def lane_of(scope: Scope) -> str | None:
    """``inference``, ``api``, or None for a request no rate limit applies to."""
    name = getattr(scope.get("route"), "name", None)
    if name in INFERENCE_ROUTES:
        return "inference"
    if name in UNLIMITED_ROUTES:
        return None
    path: str = scope.get("path", "")
    return "api" if path.startswith(LIMITED_PREFIXES) else None


def parse_limits(value: str) -> list[RateLimitItem]:
    """A setting's limits (``"off"``: none); settings validated the notation already."""
    return [] if value.strip().lower() == "off" else parse_many(value)


def describe(item: RateLimitItem, what: str = "requests") -> str:
    """``3 requests per second``, ``600 requests per minute``, ``10 requests per 5 seconds``."""
    unit = item.GRANULARITY.name
    per = unit if item.multiples == 1 else f"{item.multiples} {unit}s"
    return f"{item.amount} {what} per {per}"


class RateLimits:
    """The limiter of one server: per-key limits from the settings, per-project ones
    from the ``quotas`` table (cached for ``ttl`` seconds)."""

    def __init__(self, db: Database, *, api: str, inference: str, ttl: float = 5.0) -> None:
        self.db = db
        self.ttl = ttl
        self.per_key = {"api": parse_limits(api), "inference": parse_limits(inference)}
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._projects: ProjectLimits = {}
        self._expires = 0.0  # time.monotonic(); 0: read them at the next request
        self._generation = 0  # bumped by every change, so a read that raced one is redone
        self._loading = False

    async def check(self, who: Principal, lane: str) -> None:
        """Count one request of ``who`` on ``lane``; raise RateLimitError past a limit."""
        if self._expires <= time.monotonic() and not self._loading:
            await self._refresh()
        limits = [(item, "key", who.key_id) for item in self.per_key[lane]]
        if who.project_id is not None:
            project = str(who.project_id)
            limits += [
                (item, "project", project)
                for item in self._projects.get(who.project_id, {}).get(lane, ())
            ]
        if len(limits) == 1:  # the usual case: a hit alone counts only if it passes
            item, whose, ident = limits[0]
            if not self._limiter.hit(item, lane, whose, ident):
                self._refuse(item, lane, whose, ident, who)
            return
        # all tested before any is counted, so a refused request uses up no limit; no
        # await between the two, so no other request of this loop comes in between
        for item, whose, ident in limits:
            if not self._limiter.test(item, lane, whose, ident):
                self._refuse(item, lane, whose, ident, who)
        for item, whose, ident in limits:
            self._limiter.hit(item, lane, whose, ident)

    def invalidate(self) -> None:
        """The projects' limits changed: read them again at the next request."""
        self._generation += 1
        self._expires = 0.0

    def invalidate_on_commit(self, session: Session) -> None:
        """Invalidate once ``session`` commits (earlier, a request could read and cache
        the limits as they were for another ``ttl``)."""
        event.listen(session, "after_commit", lambda _s: self.invalidate(), once=True)

    async def _refresh(self) -> None:
        self._loading = True
        generation = self._generation
        try:
            projects = await run_in_threadpool(self._read)
        finally:
            self._loading = False
        self._projects = projects
        if generation == self._generation:  # else a change came meanwhile: read again
            self._expires = time.monotonic() + self.ttl

    def _read(self) -> ProjectLimits:
        projects: ProjectLimits = defaultdict(lambda: defaultdict(list))
        lane_of_kind = {kind: lane for lane, kind in KIND_OF_LANE.items()}
        with self.db.session() as s:
            for quota in rate_quotas(s):
                if quota.kind in RATE_KINDS and quota.limit >= 1:
                    item = parse_many(f"{int(quota.limit)}/{quota.period}")[0]
                    projects[quota.project_id][lane_of_kind[quota.kind]].append(item)
        return {pid: dict(lanes) for pid, lanes in projects.items()}

    def _refuse(
        self, item: RateLimitItem, lane: str, whose: str, ident: str, who: Principal
    ) -> NoReturn:
        reset = self._limiter.get_window_stats(item, lane, whose, ident).reset_time
        retry = max(1, math.ceil(reset - time.time()))
        allowed = describe(item, WORDS[lane])
        if whose == "key":
            limit = f"this API key may make {allowed} ({SETTING_OF_LANE[lane]})"
        else:
            limit = f"project {who.project} allows {allowed} (its {KIND_OF_LANE[lane]} quota)"
        raise RateLimitError(
            f"rate limit exceeded: {limit}; retry after {retry} s",
            field=f"rate_limit.{whose}",
            retry_after=retry,
        )


def refused(request: Request, response: Response, exc: RateLimitError) -> None:
    """Complete a 429 answer: its ``Retry-After``, and the refusal counted in the
    ``kiln_rate_limited`` metric (by project, lane, and whose limit it was)."""
    response.headers["Retry-After"] = str(exc.retry_after)
    who: Principal | None = getattr(request.state, "principal", None)
    manager = getattr(request.app.state, "deployments", None)
    if manager is not None:
        whose = (exc.field or "").rpartition(".")[2]
        lane = lane_of(request.scope) or ""
        project = (who.project or "") if who is not None else ""
        manager.metrics.rate_limited.labels(project, lane, whose).inc()
