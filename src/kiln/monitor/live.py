"""Live monitoring of one deployment, in memory: its recent requests and input drift.

:class:`RequestWindow` keeps per-second tallies of the last few minutes (requests by
status and version, rows, latency histograms, batches), so the dashboard can chart a
deployment without a Prometheus server. Memory is bounded by the horizon (300
one-second buckets), whatever the request rate. Latency percentiles come from
log-spaced histogram bins (each 9% wider than the last), so they are within about
±5% of the exact value.

:class:`DriftFeed` collects the checked rows of answered requests for a
:class:`~kiln.monitor.drift.DriftWindow`. Adding is an append on the serving path;
the population stability index is computed only when a report is asked for (the API,
a Prometheus scrape), and a report is reused until new rows arrive.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import NotRequired, TypedDict

import pandas as pd
from pydantic import JsonValue

from kiln.monitor.drift import DriftWindow

HORIZON = 300
"""Seconds of history a window keeps (the live charts' span)."""
STEP = 5
"""Seconds per point of the time series."""
_LOW = 1e-5  # seconds: the upper edge of the first latency bin
_RATIO = 2 ** (1 / 8)
_LOG_RATIO = math.log(_RATIO)
MIN_DRIFT_ROWS = 100
"""Below this many rows (or the window's size, if smaller) no column is flagged yet:
a PSI over a handful of rows is noise."""


class VersionCounts(TypedDict):
    """What one version answered in a summary's span."""

    requests: int
    rows: int
    errors: int


class SeriesPoint(TypedDict):
    """One step of the live charts' time series (rates per second; None: no requests)."""

    time: int  # the step's start, epoch seconds
    requests_per_s: float
    rows_per_s: float
    error_rate: float
    p50_ms: float | None
    p99_ms: float | None
    mean_batch_rows: float | None


class WindowSummary(TypedDict):
    """A deployment's recent traffic (:meth:`RequestWindow.summary`), the JSON of its
    window route and live panel, keys in this order."""

    seconds: float
    requests: int
    requests_per_s: float
    rows: int
    rows_per_s: float
    errors: int
    error_rate: float
    statuses: dict[str, int]  # HTTP-equivalent status -> requests
    p50_ms: float | None
    p99_ms: float | None
    batches: int
    mean_batch_rows: float | None
    queue_depth: int
    versions: dict[str, VersionCounts]
    series: list[SeriesPoint]


class DeploymentWindow(WindowSummary):
    """The :class:`WindowSummary` of a named deployment, as its window route answers
    (``deployment``, ``model`` and ``state`` first)."""

    deployment: str
    model: str
    state: str


class ColumnReport(TypedDict):
    """One column's drift: its PSI (None: no data) and whether it is flagged."""

    psi: float | None
    drifted: bool


class DriftReport(TypedDict):
    """A deployment's input drift (:meth:`DriftFeed.report`, :func:`no_drift`); without
    reference statistics, ``reference`` is False and ``message`` says why."""

    rows: int
    threshold: float
    version: int | None
    reference: bool
    message: NotRequired[str]
    columns: dict[str, ColumnReport]
    drifted: list[str]


def _latency_bin(seconds: float) -> int:
    if seconds <= _LOW:
        return 0
    return int(math.log(seconds / _LOW) / _LOG_RATIO) + 1


def _bin_value(index: int) -> float:
    """A bin's representative latency (seconds): the geometric middle of its edges."""
    if index == 0:
        return _LOW / 2
    return float(_LOW * _RATIO ** (index - 0.5))


class _Second:
    """What happened in one wall-clock second."""

    __slots__ = ("batch_rows", "batches", "errors", "latency", "requests", "rows", "statuses")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.rows = 0  # rows answered (successful requests only)
        self.statuses: dict[int, int] = {}
        self.latency: dict[int, int] = {}  # latency bin -> requests
        self.batches = 0
        self.batch_rows = 0


class _Tally:
    """Sums over several seconds."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.rows = 0
        self.batches = 0
        self.batch_rows = 0
        self.statuses: dict[int, int] = {}
        self.latency: dict[int, int] = {}

    def add(self, second: _Second) -> None:
        self.requests += second.requests
        self.errors += second.errors
        self.rows += second.rows
        self.batches += second.batches
        self.batch_rows += second.batch_rows
        for status, n in second.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + n
        for index, n in second.latency.items():
            self.latency[index] = self.latency.get(index, 0) + n

    def percentile_ms(self, q: float) -> float | None:
        total = sum(self.latency.values())
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for index in sorted(self.latency):
            seen += self.latency[index]
            if seen >= rank:
                return round(_bin_value(index) * 1000, 4)
        return None  # pragma: no cover - the loop always reaches the rank


class RequestWindow:
    """Per-second tallies of a deployment's requests over the last ``horizon`` seconds.

    A request's status is its HTTP-equivalent one: 200 answered, 422 bad input, 429
    over a quota, 503 queue full, 504 past its timeout. ``version`` is the version that
    took the request (None when it was refused before one was picked).
    """

    def __init__(self, horizon: int = HORIZON, clock: Callable[[], float] = time.time) -> None:
        self.horizon = horizon
        self.clock = clock
        self.started = clock()
        self._seconds: dict[int, _Second] = {}  # in insertion (time) order
        self._versions: dict[int, dict[int, list[int]]] = {}  # second -> version -> counts

    def _second(self) -> tuple[int, _Second]:
        now = int(self.clock())
        second = self._seconds.get(now)
        if second is None:
            second = self._seconds[now] = _Second()
            self._prune(now)
        return now, second

    def _prune(self, now: int) -> None:
        cutoff = now - self.horizon
        while self._seconds:
            first = next(iter(self._seconds))
            if first > cutoff:
                break
            del self._seconds[first]
            self._versions.pop(first, None)

    def record(self, seconds: float, status: int, rows: int, version: int | None) -> None:
        """One request: its latency (seconds), status, rows and answering version."""
        now, second = self._second()
        second.requests += 1
        second.statuses[status] = second.statuses.get(status, 0) + 1
        index = _latency_bin(seconds)
        second.latency[index] = second.latency.get(index, 0) + 1
        ok = status < 400
        if ok:
            second.rows += rows
        else:
            second.errors += 1
        if version is not None:
            per_version = self._versions.setdefault(now, {})
            counts = per_version.get(version)
            if counts is None:
                counts = per_version[version] = [0, 0, 0]  # requests, rows, errors
            counts[0] += 1
            if ok:
                counts[1] += rows
            else:
                counts[2] += 1

    def record_batch(self, rows: int) -> None:
        """One batch the model ran, of ``rows`` rows."""
        _, second = self._second()
        second.batches += 1
        second.batch_rows += rows

    def summary(self, seconds: float = 60, *, queue_depth: int = 0) -> WindowSummary:
        """Rates and latencies over the last ``seconds``, and the time series of the
        horizon (``series``: one point per 5 s, oldest first)."""
        seconds = max(1.0, min(float(seconds), float(self.horizon)))
        now = self.clock()
        cutoff = now - seconds
        tally = _Tally()
        versions: dict[int, list[int]] = {}
        for key, second in list(self._seconds.items()):
            if key <= cutoff:
                continue
            tally.add(second)
            for version, counts in self._versions.get(key, {}).items():
                total = versions.setdefault(version, [0, 0, 0])
                for i in range(3):
                    total[i] += counts[i]
        # a window younger than ``seconds`` is averaged over its own age
        span = max(1.0, min(seconds, now - self.started))
        return {
            "seconds": seconds,
            "requests": tally.requests,
            "requests_per_s": round(tally.requests / span, 4),
            "rows": tally.rows,
            "rows_per_s": round(tally.rows / span, 4),
            "errors": tally.errors,
            "error_rate": round(tally.errors / tally.requests, 6) if tally.requests else 0.0,
            "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
            "p50_ms": tally.percentile_ms(0.5),
            "p99_ms": tally.percentile_ms(0.99),
            "batches": tally.batches,
            "mean_batch_rows": round(tally.batch_rows / tally.batches, 4)
            if tally.batches
            else None,
            "queue_depth": queue_depth,
            "versions": {
                str(v): {"requests": c[0], "rows": c[1], "errors": c[2]}
                for v, c in sorted(versions.items())
            },
            "series": self.series(now),
        }

    def series(self, now: float | None = None, step: int = STEP) -> list[SeriesPoint]:
        """One point per ``step`` seconds over the horizon: its start (epoch seconds),
        rates per second, error share and latency percentiles (None without requests)."""
        now = self.clock() if now is None else now
        last = int(now) // step * step
        first = last - (self.horizon // step - 1) * step
        tallies = {start: _Tally() for start in range(first, last + 1, step)}
        for key, second in list(self._seconds.items()):
            tally = tallies.get(key // step * step)
            if tally is not None:
                tally.add(second)
        points: list[SeriesPoint] = []
        for start, tally in tallies.items():
            # the current step has lasted only until now
            span = max(1.0, min(float(step), now - start))
            points.append(
                {
                    "time": start,
                    "requests_per_s": round(tally.requests / span, 4),
                    "rows_per_s": round(tally.rows / span, 4),
                    "error_rate": round(tally.errors / tally.requests, 6)
                    if tally.requests
                    else 0.0,
                    "p50_ms": tally.percentile_ms(0.5),
                    "p99_ms": tally.percentile_ms(0.99),
                    "mean_batch_rows": round(tally.batch_rows / tally.batches, 4)
                    if tally.batches
                    else None,
                }
            )
        return points


class DriftFeed:
    """The rows a deployment answered, fed to a drift window against one version's
    reference statistics.

    ``add`` may be called on the event loop while ``report`` runs on another thread
    (a scrape): rows wait in a queue of their own, bounded to about ``size`` rows.
    """

    def __init__(
        self, reference: Mapping[str, JsonValue], *, size: int, threshold: float, version: int
    ) -> None:
        self.version = version
        self.size = size
        self.threshold = threshold
        self.available = bool(reference.get("columns"))
        self._window = DriftWindow(reference, size=size) if self.available else None
        self._pending: deque[tuple[pd.DataFrame, int]] = deque()  # (frame, its rows)
        self._pending_rows = 0
        self._added = 0  # frames ever added: a report is current while this is unchanged
        self._lock = threading.Lock()  # the pending queue (held for microseconds)
        self._computing = threading.Lock()  # the window and the cached report
        self._cached: tuple[int, DriftReport] | None = None

    def add(self, frame: pd.DataFrame) -> None:
        """Queue the checked rows of an answered request (cheap: no maths here)."""
        if self._window is None:
            return
        n = len(frame.index)
        pending = self._pending
        with self._lock:
            pending.append((frame, n))
            self._pending_rows += n
            self._added += 1
            # rows the window would push out anyway are dropped now
            while self._pending_rows - pending[0][1] >= self.size:
                self._pending_rows -= pending.popleft()[1]

    def report(self) -> DriftReport:
        """``{rows, threshold, version, reference, columns: {name: {psi, drifted}},
        drifted: [names]}``; without reference statistics, ``reference`` is False and
        ``message`` says why."""
        if self._window is None:
            return no_drift(
                self.threshold,
                self.version,
                f"version {self.version}'s bundle has no reference statistics of its "
                "training inputs (it predates them); retrain it to monitor drift",
            )
        with self._computing:
            with self._lock:
                added = self._added
                if self._cached is not None and self._cached[0] == added:
                    return self._cached[1]
                frames = [frame for frame, _ in self._pending]
                self._pending.clear()
                self._pending_rows = 0
            if frames:
                self._window.add(frames[0] if len(frames) == 1 else pd.concat(frames))
            report = self._checked(self._window)
            self._cached = (added, report)
            return report

    def _checked(self, drift: DriftWindow) -> DriftReport:
        """The window's report with this feed's version, flagging nothing while it has
        too few rows for a PSI to mean anything."""
        window = drift.report(self.threshold)
        columns: dict[str, ColumnReport] = {
            name: {"psi": column["psi"], "drifted": column["drifted"]}
            for name, column in window["columns"].items()
        }
        report: DriftReport = {
            "rows": window["rows"],
            "threshold": window["threshold"],
            "columns": columns,
            "drifted": list(window["drifted"]),
            "version": self.version,
            "reference": True,
        }
        enough = min(MIN_DRIFT_ROWS, self.size)
        if report["rows"] < enough:
            for column in columns.values():
                column["drifted"] = False
            report["drifted"] = []
            report["message"] = f"fewer than {enough} rows so far: nothing is flagged yet"
        return report


def no_drift(threshold: float, version: int | None, message: str) -> DriftReport:
    """A drift report where there is nothing to compare: ``message`` says why."""
    return {
        "rows": 0,
        "threshold": threshold,
        "version": version,
        "reference": False,
        "message": message,
        "columns": {},
        "drifted": [],
    }
