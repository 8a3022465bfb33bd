"""A deployment's live window (rates, latencies, errors, series) and its drift feed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kiln.monitor.drift import reference_stats
from kiln.monitor.live import HORIZON, DriftFeed, RequestWindow


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_window_counts_requests_by_status_and_version() -> None:
    clock = Clock()
    window = RequestWindow(clock=clock)
    clock.t += 120  # older than the 60 s asked for: rates are per 60 s
    for _ in range(10):
        window.record(0.002, 200, 3, 1)
    window.record(0.050, 422, 2, 1)  # bad input: an error, its rows not counted
    window.record(0.001, 429, 5, None)  # over a quota, before any version took it
    window.record(0.004, 503, 1, 2)
    window.record_batch(6)
    window.record_batch(24)
    s = window.summary(60, queue_depth=2)
    assert s["requests"] == 13 and s["rows"] == 30 and s["errors"] == 3
    assert s["requests_per_s"] == pytest.approx(13 / 60, abs=1e-4)
    assert s["rows_per_s"] == pytest.approx(30 / 60, abs=1e-4)
    assert s["error_rate"] == pytest.approx(3 / 13, abs=1e-6)
    assert s["statuses"] == {"200": 10, "422": 1, "429": 1, "503": 1}
    assert s["p50_ms"] == pytest.approx(2.0, rel=0.05)
    assert s["p99_ms"] == pytest.approx(50.0, rel=0.05)
    assert s["batches"] == 2 and s["mean_batch_rows"] == 15
    assert s["queue_depth"] == 2
    assert s["versions"] == {
        "1": {"requests": 11, "rows": 30, "errors": 1},
        "2": {"requests": 1, "rows": 0, "errors": 1},
    }


def test_a_young_window_averages_over_its_age() -> None:
    clock = Clock()
    window = RequestWindow(clock=clock)
    clock.t += 4
    for _ in range(8):
        window.record(0.001, 200, 1, 1)
    assert window.summary(60)["requests_per_s"] == pytest.approx(2.0)


def test_old_requests_leave_the_window_and_memory_stays_bounded() -> None:
    clock = Clock()
    window = RequestWindow(clock=clock)
    clock.t += 1000
    window.record(0.001, 200, 1, 1)
    clock.t += 61
    summary = window.summary(60)
    assert summary["requests"] == 0 and summary["p50_ms"] is None
    assert summary["error_rate"] == 0.0 and summary["mean_batch_rows"] is None
    assert sum(p["requests_per_s"] for p in summary["series"]) > 0  # still charted
    for _ in range(3 * HORIZON):  # a request every second for 15 minutes
        clock.t += 1
        window.record(0.001, 200, 1, 1)
    assert len(window._seconds) <= HORIZON + 1
    assert len(window._versions) <= HORIZON + 1
    assert window.summary(60)["requests"] == 60


def test_series_has_a_point_per_five_seconds_over_five_minutes() -> None:
    clock = Clock(1_700_000_000.0)  # a multiple of 5
    window = RequestWindow(clock=clock)
    clock.t += 400
    for _ in range(10):
        window.record(0.003, 200, 2, 1)
    window.record(0.003, 504, 2, 1)
    clock.t += 2.5  # half-way through the current step
    series = window.summary()["series"]
    assert len(series) == HORIZON // 5
    times = [p["time"] for p in series]
    assert times == sorted(times) and times[1] - times[0] == 5
    assert times[-1] <= clock.t < times[-1] + 5
    last = series[-1]
    assert last["requests_per_s"] == pytest.approx(11 / 2.5)
    assert last["rows_per_s"] == pytest.approx(20 / 2.5)
    assert last["error_rate"] == pytest.approx(1 / 11, abs=1e-6)
    assert last["p50_ms"] == pytest.approx(3.0, rel=0.05)
    assert all(p["requests_per_s"] == 0 and p["p99_ms"] is None for p in series[:-1])


def _frame(n: int, shift: float = 0.0, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"x": rng.normal(shift, 1.0, n), "y": rng.normal(0.0, 1.0, n)})


REFERENCE = reference_stats(_frame(5000), [("x", "numeric"), ("y", "numeric")])


def test_drift_feed_reports_a_shift_and_reuses_its_report() -> None:
    feed = DriftFeed(REFERENCE, size=200, threshold=0.2, version=3)
    moved = _frame(500, shift=2.0, seed=1)
    for i in range(500):  # one row per request, as a busy deployment sees them
        feed.add(moved.iloc[i : i + 1])
    assert sum(n for _, n in feed._pending) <= 200  # rows the window drops wait nowhere
    report = feed.report()
    assert report["rows"] == 200 and report["version"] == 3 and report["reference"]
    assert report["drifted"] == ["x"] and report["columns"]["x"]["psi"] > 1
    assert feed.report() is report  # nothing new: not computed again
    feed.add(_frame(200, seed=2))
    fresh = feed.report()
    assert fresh is not report and fresh["drifted"] == []


def test_drift_feed_flags_nothing_on_a_handful_of_rows() -> None:
    feed = DriftFeed(REFERENCE, size=1000, threshold=0.2, version=1)
    feed.add(_frame(20, shift=3.0))
    report = feed.report()
    assert report["rows"] == 20 and report["drifted"] == []
    assert report["columns"]["x"]["psi"] > 0.2 and not report["columns"]["x"]["drifted"]
    assert "fewer than 100 rows" in report["message"]


def test_a_version_without_reference_statistics_says_so() -> None:
    feed = DriftFeed({}, size=100, threshold=0.2, version=7)
    feed.add(_frame(10))
    report = feed.report()
    assert report["reference"] is False and report["columns"] == {} and report["drifted"] == []
    assert "version 7" in report["message"] and "no reference" in report["message"]
