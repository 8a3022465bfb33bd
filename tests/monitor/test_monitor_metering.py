"""Prediction metering: in-memory counts written as usage events; quotas from a cache."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from kiln.errors import QuotaError
from kiln.monitor import usage
from kiln.monitor.metering import PredictionMeter
from kiln.store.db import Database
from kiln.store.projects import ensure_project
from kiln.store.tables import UsageEvent


def _project(db: Database, name: str = "default") -> int:
    with db.session() as s:
        return ensure_project(s, name).id


def _totals(db: Database, project_id: int) -> dict[str, float]:
    with db.session() as s:
        out: dict[str, float] = usage.summary(
            s, project_id, start=None, end=None, group_by="total"
        )["totals"]
        return out


class NoDatabase:
    """Stands in for the database where none may be touched."""

    def session(self) -> Any:
        raise AssertionError("the serving path touched the database")


def test_flush_writes_answered_requests_and_rows(db: Database) -> None:
    pid = _project(db)

    async def scenario() -> None:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        meter.db = NoDatabase()  # type: ignore[assignment]
        for deployment, rows in [("a", 1), ("a", 2), ("b", 3)]:
            meter.reserve(pid, rows)
            meter.commit(pid, deployment, rows)
        meter.reserve(pid, 5)
        meter.release(pid, 5)  # refused later (a bad row, a full queue): not counted
        assert meter.pending(pid) == {"prediction_requests": 3, "prediction_rows": 6}
        meter.db = db
        await meter.flush()
        assert meter.pending(pid) == {"prediction_requests": 0, "prediction_rows": 0}
        await meter.flush()  # nothing new: nothing written twice

    asyncio.run(scenario())
    assert _totals(db, pid) == {"prediction_requests": 3, "prediction_rows": 6}
    with db.session() as s:
        events = s.scalars(select(UsageEvent).where(UsageEvent.kind == "prediction_rows")).all()
        assert sorted((e.subject, e.quantity) for e in events) == [("a", 3.0), ("b", 3.0)]


def test_quotas_are_checked_from_the_cache_with_what_is_not_written_yet(db: Database) -> None:
    pid = _project(db)
    other = _project(db, "other")
    with db.session() as s:
        usage.set_quota(s, pid, "prediction_rows", "day", 10)
        usage.set_quota(s, pid, "prediction_requests", "total", 5)

    async def scenario() -> None:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        await meter.prepare(other)
        meter.db = NoDatabase()  # type: ignore[assignment]
        meter.reserve(pid, 6)
        meter.commit(pid, "a", 6)
        meter.reserve(pid, 4)  # in flight: reaching the limit is fine
        with pytest.raises(QuotaError, match=r"prediction_rows per day is 10; 10 used"):
            meter.reserve(pid, 1)  # a concurrent request cannot slip past it
        meter.commit(pid, "a", 4)
        for _ in range(20):  # another project has no quotas
            meter.reserve(other, 100)
        meter.db = db
        await meter.flush()  # written; the cache now has it as used
        with pytest.raises(QuotaError) as caught:
            meter.reserve(pid, 1)
        assert caught.value.http_status == 429 and caught.value.field == "prediction_rows"
        with db.session() as s:
            usage.set_quota(s, pid, "prediction_rows", "day", None)
        await meter.flush()  # refreshes the projects that were active
        meter.reserve(pid, 50)
        meter.reserve(pid, 1)
        meter.reserve(pid, 1)  # the 5th request
        with pytest.raises(QuotaError, match=r"prediction_requests in total is 5"):
            meter.reserve(pid, 1)

    asyncio.run(scenario())


def test_a_new_meter_reads_the_usage_already_written(db: Database) -> None:
    pid = _project(db)
    with db.session() as s:
        usage.set_quota(s, pid, "prediction_rows", "month", 3)
        usage.record(s, pid, "prediction_rows", 3, subject="a")

    async def scenario() -> None:
        meter = PredictionMeter(db)
        assert meter.needs_load(pid)
        await meter.prepare(pid)
        assert not meter.needs_load(pid)
        with pytest.raises(QuotaError, match="prediction_rows per month is 3"):
            meter.reserve(pid, 1)

    asyncio.run(scenario())


def test_a_stale_cache_is_read_again() -> None:
    now = [0.0]
    nodb: Any = NoDatabase()
    meter = PredictionMeter(nodb, stale_after=30, clock=lambda: now[0])
    assert meter.needs_load(1)
    meter._limits[1] = _empty(now[0])
    assert not meter.needs_load(1)
    now[0] = 31.0
    assert meter.needs_load(1)


def _empty(loaded: float) -> Any:
    from kiln.monitor.metering import _Limits

    return _Limits(quotas=[], used={}, starts={}, loaded=loaded)


def test_counts_survive_a_failed_write(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    pid = _project(db)

    async def scenario() -> None:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        meter.reserve(pid, 2)
        meter.commit(pid, "a", 2)
        meter.db = NoDatabase()  # type: ignore[assignment]
        with caplog.at_level(logging.ERROR, logger="kiln.monitor"):
            await meter.flush()
        assert "could not be written" in caplog.text
        assert meter.pending(pid) == {"prediction_requests": 1, "prediction_rows": 2}
        meter.db = db
        await meter.flush()

    asyncio.run(scenario())
    assert _totals(db, pid) == {"prediction_requests": 1, "prediction_rows": 2}


def test_a_new_day_starts_from_nothing_before_the_cache_is_refreshed(db: Database) -> None:
    pid = _project(db)
    with db.session() as s:
        usage.set_quota(s, pid, "prediction_rows", "day", 5)
        usage.set_quota(s, pid, "prediction_rows", "total", 8)
        usage.record(s, pid, "prediction_rows", 5, subject="a")

    async def scenario() -> None:
        meter = PredictionMeter(db)
        await meter.prepare(pid)
        with pytest.raises(QuotaError, match="per day"):
            meter.reserve(pid, 1)
        limits = meter._limits[pid]
        limits.starts["day"] = limits.starts["day"] - timedelta(days=1)  # read yesterday
        limits.until = time.time() - 1
        meter.reserve(pid, 3)  # today's quota is untouched; the total still counts
        with pytest.raises(QuotaError, match="in total is 8"):
            meter.reserve(pid, 1)

    asyncio.run(scenario())
