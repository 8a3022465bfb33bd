"""The deployment monitor on its own: what one answered, refused or failed request
and one batch leave in the window, the metered usage, the metrics and the log."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from kiln.errors import QuotaError
from kiln.monitor.drift import reference_stats
from kiln.monitor.metrics import ServingMetrics
from kiln.monitor.serving import Answer, DeploymentMonitor, DeploymentWatch, Served
from kiln.settings import Settings
from kiln.store.artifacts import open_store
from kiln.store.db import Database
from kiln.store.projects import ensure_project
from kiln.store.tables import Quota


@dataclass
class Output:
    predictions: list[object]
    probabilities: list[list[float]] | None = None
    labels: list[object] | None = None


@dataclass
class Batch:
    rows: int
    waits: list[float] = field(default_factory=list)
    model_seconds: float = 0.001


def _monitor(db: Database, tmp_path: Path, watch: DeploymentWatch) -> DeploymentMonitor:
    settings = Settings(home=tmp_path / "home", prediction_log_sample=1.0)
    store = open_store(str(tmp_path / "artifacts"))
    return DeploymentMonitor(db, store, ServingMetrics(), settings, watches=lambda: [watch])


def _answered(project_id: int, frame: pd.DataFrame, seconds: float = 0.01) -> Served:
    output = Output(predictions=[0] * len(frame))
    rows = frame.to_dict("records")
    answer = Answer(version=2, frame=frame, inputs=rows, output=output)  # type: ignore[arg-type]
    return Served(project_id, len(frame), seconds, 200, 2, admitted=True, answer=answer)


def test_an_answered_request_is_counted_logged_and_fed_to_drift(
    db: Database, tmp_path: Path
) -> None:
    with db.session() as s:
        pid = ensure_project(s, "default").id
    watch = DeploymentWatch("default", "iris")
    frame = pd.DataFrame({"x": [float(i) for i in range(150)]})

    async def scenario() -> None:
        monitor = _monitor(db, tmp_path, watch)
        monitor.follow(watch, 2, reference_stats(frame, [("x", "numeric")]))
        await monitor.admit(pid, len(frame))
        monitor.observe(watch, _answered(pid, frame))
        await monitor.admit(pid, 3)
        monitor.observe(watch, Served(pid, 3, 0.02, 503, 2, admitted=True))  # queue full
        monitor.batches(watch, 2)(Batch(rows=150, waits=[0.001, 0.002]))
        assert monitor.meter.pending(pid) == {"prediction_requests": 1, "prediction_rows": 150}
        summary = watch.window.summary(60)
        assert (summary["requests"], summary["rows"], summary["errors"]) == (2, 150, 1)
        assert summary["statuses"] == {"200": 1, "503": 1} and summary["batches"] == 1
        report = monitor.drift(watch, "unused")
        assert report["rows"] == 150 and report["version"] == 2
        (record,) = monitor.predlog.read("default", "iris", 10)
        assert record["version"] == 2 and len(record["inputs"]) == 150  # type: ignore[arg-type]
        text = monitor.metrics.render().decode()
        assert 'kiln_drift_psi{column="x",deployment="iris",project="default"}' in text
        await monitor.close()

    asyncio.run(scenario())


def test_a_request_past_the_quota_is_refused_before_it_counts(db: Database, tmp_path: Path) -> None:
    with db.session() as s:
        pid = ensure_project(s, "default").id
        s.add(Quota(project_id=pid, kind="prediction_requests", period="day", limit=1))
    watch = DeploymentWatch("default", "iris")

    async def scenario() -> None:
        monitor = _monitor(db, tmp_path, watch)
        await monitor.admit(pid, 1)
        monitor.observe(watch, _answered(pid, pd.DataFrame({"x": [1.0]})))
        with pytest.raises(QuotaError):
            await monitor.admit(pid, 1)
        assert monitor.meter.pending(pid)["prediction_requests"] == 1
        monitor.follow(watch, None, {})
        assert monitor.drift(watch, "no routes")["message"] == "no routes"
        await monitor.close()

    asyncio.run(scenario())
