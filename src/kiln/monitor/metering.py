"""Prediction and token metering: requests, rows and language-model tokens served,
counted in memory, written in batches.

The serving path never waits on the database: :meth:`PredictionMeter.reserve` checks a
project's ``prediction_requests`` and ``prediction_rows`` quotas against a cached
copy of its quotas and usage so far, plus what this process has counted but not yet
written (and what requests in flight have reserved, so concurrent requests cannot all
slip past a limit). :meth:`PredictionMeter.flush`, run every few seconds by the
deployment manager, writes the counts as usage events (``subject`` = the deployment)
and refreshes the cache of the projects that were active; a project the cache has not
seen for a while is read once, off the event loop, by :meth:`PredictionMeter.prepare`.

Tokens (``/v1``, see :mod:`kiln.monitor.token_meter`) go the same way: a request
holds its tokens against the ``tokens`` quotas (:meth:`PredictionMeter.reserve_tokens`,
:meth:`PredictionMeter.hold_tokens`), :meth:`PredictionMeter.tokens_reached` says when a
quota is reached mid-stream, and :meth:`PredictionMeter.commit_tokens` counts what was
used, written as ``prompt_tokens`` / ``completion_tokens`` events per (deployment, key).

A quota set on this server applies at its next request
(:meth:`PredictionMeter.invalidate_on_commit`); other servers sharing the database
apply it within ``stale_after`` seconds (5), since no request is judged on a cache
older than that.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from kiln.errors import QuotaError
from kiln.monitor import usage
from kiln.monitor.usage import TOKENS
from kiln.store.db import Database
from kiln.store.tables import Quota

log = logging.getLogger("kiln.monitor")

REQUESTS, ROWS = "prediction_requests", "prediction_rows"
PROMPT, COMPLETION = usage.TOKEN_KINDS
KINDS = (REQUESTS, ROWS, TOKENS)
"""The quota kinds the meter enforces from its cache."""


@dataclass
class _Limits:
    """A project's prediction quotas and its usage as the database had it at ``loaded``."""

    quotas: list[tuple[str, str, float]]  # (kind, period, limit)
    used: dict[tuple[str, str], float]  # (kind, period) -> used in the period
    starts: dict[str, datetime | None]  # period -> the start ``used`` counts from
    loaded: float  # monotonic seconds
    until: float = math.inf  # epoch seconds: when the first of these periods ends


K = TypeVar("K")
TokenKey = tuple[str, str | None]
"""(deployment, API key id) of metered tokens."""


@dataclass
class _Unwritten:
    """Requests, rows and tokens this process counted (or reserved) and has not written."""

    requests: float = 0.0
    rows: float = 0.0
    by_deployment: dict[str, list[float]] = field(default_factory=dict)  # answered: [req, rows]
    tokens: float = 0.0  # held by requests in flight + counted, not written yet
    by_key: dict[TokenKey, list[float]] = field(default_factory=dict)  # [prompt, completion]


class PredictionMeter:
    """Counts predictions per (project, deployment); enforces prediction quotas."""

    def __init__(
        self,
        db: Database,
        *,
        stale_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.stale_after = stale_after
        self.clock = clock
        self._limits: dict[int, _Limits] = {}
        self._unwritten: dict[int, _Unwritten] = {}
        self._touched: set[int] = set()  # projects checked since the last refresh
        # bumped by every quota change, so a read that raced one is not cached
        self._generation: dict[int, int] = {}

    # ---- the serving path (event loop, no I/O) ------------------------------------

    def needs_load(self, project_id: int) -> bool:
        """True if the project's quotas are unknown or stale (see :meth:`prepare`)."""
        limits = self._limits.get(project_id)
        return limits is None or self.clock() - limits.loaded > self.stale_after

    def reserve(self, project_id: int, rows: int) -> None:
        """Check one request of ``rows`` rows against the quotas and hold it as counted;
        QuotaError (429) names the quota it would pass. Follow with :meth:`commit`
        (answered) or :meth:`release` (not)."""
        self._touched.add(project_id)
        pending = self._unwritten.get(project_id)
        if pending is None:
            pending = self._unwritten[project_id] = _Unwritten()
        limits = self._limits.get(project_id)
        if limits is not None and limits.quotas:
            _check(limits, REQUESTS, 1, pending.requests)
            _check(limits, ROWS, rows, pending.rows)
        pending.requests += 1
        pending.rows += rows

    def release(self, project_id: int, rows: int) -> None:
        """A reserved request that was not answered: it does not count."""
        pending = self._unwritten[project_id]
        pending.requests -= 1
        pending.rows -= rows

    def commit(self, project_id: int, deployment: str, rows: int) -> None:
        """A reserved request was answered: it is written at the next flush."""
        counts = self._unwritten[project_id].by_deployment.setdefault(deployment, [0.0, 0.0])
        counts[0] += 1
        counts[1] += rows

    def reserve_tokens(self, project_id: int, tokens: float) -> None:
        """Check ``tokens`` more (a request's prompt; prompt + max_tokens unstreamed)
        against the project's ``tokens`` quotas and hold them as counted; QuotaError
        (429) names the quota they would pass. The request then adjusts its hold
        (:meth:`hold_tokens`) and ends with :meth:`commit_tokens`."""
        self._touched.add(project_id)
        pending = self._pending(project_id)
        limits = self._limits.get(project_id)
        if limits is not None and limits.quotas:
            _check(limits, TOKENS, tokens, pending.tokens)
        pending.tokens += tokens

    def hold_tokens(self, project_id: int, tokens: float) -> None:
        """Hold ``tokens`` more without a check (tokens being generated); a negative
        number releases a hold."""
        self._pending(project_id).tokens += tokens

    def tokens_reached(self, project_id: int) -> QuotaError | None:
        """The error of the first ``tokens`` quota that the project's usage (written,
        counted and held) has reached, or None."""
        limits = self._limits.get(project_id)
        if limits is None or not limits.quotas:
            return None
        try:
            _check(limits, TOKENS, 0, self._pending(project_id).tokens)
        except QuotaError as exc:
            return exc
        return None

    def tokens_left(self, project_id: int) -> float | None:
        """Tokens the project may still use before its first ``tokens`` quota (written,
        counted and held usage deducted; 0 or less once reached); None without one."""
        limits = self._limits.get(project_id)
        if limits is None:
            return None
        pending = self._pending(project_id).tokens
        left = [
            limit - _used(limits, kind, period) - pending
            for kind, period, limit in limits.quotas
            if kind == TOKENS
        ]
        return min(left, default=None)

    def commit_tokens(
        self, project_id: int, deployment: str, key_id: str | None, prompt: int, completion: int
    ) -> None:
        """Tokens a request used (already held, see :meth:`hold_tokens`): written at the
        next flush as ``prompt_tokens`` and ``completion_tokens`` of (deployment, key)."""
        counts = self._pending(project_id).by_key.setdefault((deployment, key_id), [0.0, 0.0])
        counts[0] += prompt
        counts[1] += completion

    def pending_tokens(self, project_id: int) -> float:
        """Tokens of the project held or counted and not in the database yet."""
        unwritten = self._unwritten.get(project_id)
        return 0.0 if unwritten is None else unwritten.tokens

    def _pending(self, project_id: int) -> _Unwritten:
        pending = self._unwritten.get(project_id)
        if pending is None:
            pending = self._unwritten[project_id] = _Unwritten()
        return pending

    def pending(self, project_id: int) -> dict[str, float]:
        """What the project used that is not in the database yet."""
        unwritten = self._unwritten.get(project_id, _Unwritten())
        return {REQUESTS: unwritten.requests, ROWS: unwritten.rows}

    # ---- the database (threads) ---------------------------------------------------

    async def prepare(self, project_id: int) -> None:
        """Make sure the project's quotas are cached: read them (in a thread) if they are
        unknown or stale. Active projects are refreshed by every flush, so this reads
        the database only for a project's first request in a while."""
        while self.needs_load(project_id):
            generation = self._generation.get(project_id, 0)
            limits = await asyncio.to_thread(self._load, project_id)
            if generation == self._generation.get(project_id, 0):  # else: read again
                self._limits[project_id] = limits

    def forget(self, project_id: int) -> None:
        """The project's quotas changed: read them again before its next request."""
        self._generation[project_id] = self._generation.get(project_id, 0) + 1
        self._limits.pop(project_id, None)

    def invalidate_on_commit(self, session: Session, project_id: int) -> None:
        """:meth:`forget` the project once ``session`` commits (earlier, a request could
        read and cache the quotas as they were)."""
        event.listen(session, "after_commit", lambda _s: self.forget(project_id), once=True)

    def _load(self, project_id: int) -> _Limits:
        with self.db.session() as s:
            return self._read(s, project_id)

    def _read(self, session: Any, project_id: int) -> _Limits:
        rows = session.scalars(
            select(Quota).where(Quota.project_id == project_id, Quota.kind.in_(KINDS))
        ).all()
        quotas = [(q.kind, q.period, float(q.limit)) for q in rows]
        starts = {period: usage.period_start(period) for _, period, _ in quotas}
        used = {
            (kind, period): usage.used(session, project_id, kind, starts[period])
            for kind, period, _ in quotas
        }
        return _Limits(
            quotas=quotas,
            used=used,
            starts=starts,
            loaded=self.clock(),
            until=min((_end(p, s) for p, s in starts.items()), default=math.inf),
        )

    async def flush(self) -> None:
        """Write the answered counts as usage events and refresh the active projects'
        quotas and usage; on a database error the counts wait for the next flush."""
        batch: dict[int, _Batch] = {}
        for project_id, unwritten in self._unwritten.items():
            if unwritten.by_deployment or unwritten.by_key:
                batch[project_id] = _Batch(unwritten.by_deployment, unwritten.by_key)
                unwritten.by_deployment, unwritten.by_key = {}, {}
        refresh = self._touched | set(batch)
        self._touched = set()
        generations = dict(self._generation)
        if not batch and not refresh:
            return
        try:
            fresh = await asyncio.to_thread(self._write, batch, refresh)
        except Exception as exc:
            log.error("prediction usage could not be written (will retry): %s", exc)
            for project_id, counts in batch.items():
                unwritten = self._unwritten[project_id]
                _add_into(unwritten.by_deployment, counts.predictions)
                _add_into(unwritten.by_key, counts.tokens)
            self._touched |= refresh
            return
        # in one step on the event loop: what was written leaves the pending counts as
        # the refreshed usage (which includes it) arrives
        for project_id, counts in batch.items():
            unwritten = self._unwritten[project_id]
            for requests, rows in counts.predictions.values():
                unwritten.requests -= requests
                unwritten.rows -= rows
            unwritten.tokens -= sum(p + c for p, c in counts.tokens.values())
        self._limits.update(
            (pid, limits)
            for pid, limits in fresh.items()
            if self._generation.get(pid, 0) == generations.get(pid, 0)  # no change raced it
        )

    def _write(self, batch: dict[int, _Batch], refresh: set[int]) -> dict[int, _Limits]:
        with self.db.session() as s:
            for project_id, counts in batch.items():
                for name, (requests, rows) in counts.predictions.items():
                    usage.record(s, project_id, REQUESTS, requests, subject=name)
                    usage.record(s, project_id, ROWS, rows, subject=name)
                for (name, key_id), (prompt, completion) in counts.tokens.items():
                    for kind, quantity in ((PROMPT, prompt), (COMPLETION, completion)):
                        if quantity:
                            usage.record(s, project_id, kind, quantity, subject=name, key_id=key_id)
        with self.db.session() as s:
            return {project_id: self._read(s, project_id) for project_id in refresh}


@dataclass
class _Batch:
    """One project's counts taken for one write."""

    predictions: dict[str, list[float]]  # deployment -> [requests, rows]
    tokens: dict[TokenKey, list[float]]  # (deployment, key) -> [prompt, completion]


def _add_into(into: dict[K, list[float]], counts: dict[K, list[float]]) -> None:
    """Put counts that could not be written back (summing with newer ones)."""
    for key, values in counts.items():
        again = into.setdefault(key, [0.0] * len(values))
        for i, value in enumerate(values):
            again[i] += value


def _used(limits: _Limits, kind: str, period: str) -> float:
    """The cached usage of ``kind`` in the current ``period``."""
    # a new day or month began since the cache was read: nothing of it is used yet
    if time.time() >= limits.until and usage.period_start(period) != limits.starts[period]:
        return 0.0
    return limits.used[(kind, period)]


def _check(limits: _Limits, kind: str, adding: float, pending: float) -> None:
    """As :func:`kiln.monitor.usage.check_quota`, on the cached usage."""
    for quota_kind, period, limit in limits.quotas:
        if quota_kind != kind:
            continue
        so_far = _used(limits, kind, period) + pending
        if so_far + adding > limit or (adding == 0 and so_far >= limit):
            per = "in total" if period == "total" else f"per {period}"
            needs = f", this needs {adding:g} more" if adding else ""
            raise QuotaError(
                f"quota exceeded: {kind} {per} is {limit:g}; {so_far:g} used{needs}",
                field=kind,
            )


def _end(period: str, start: datetime | None) -> float:
    """When a period that began at ``start`` ends (epoch seconds; never for ``total``)."""
    if start is None:
        return math.inf
    if period == "day":
        return (start + timedelta(days=1)).timestamp()
    month = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return month.timestamp()
