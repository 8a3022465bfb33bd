"""The prediction log: a sample of each deployment's inputs and outputs, kept as JSON lines.

A share ``sample`` of requests (``KILN_PREDICTION_LOG_SAMPLE``; 0 turns it off) is held
in memory and written every few seconds, and on shutdown, to the artifact store as
``projects/<project>/deployments/<name>/predictions/<YYYY-MM-DD>/<HHMMSS>-<n>.jsonl``
(UTC; the names sort by time). Each line is one request: ``time``, ``version``,
``inputs`` (its rows), ``predictions`` and, for a classifier, ``probabilities`` and
``labels``. A deployment's log stops growing at ``max_bytes``
(``KILN_PREDICTION_LOG_MAX_MB``); the server says so once in its log.

Serialising and writing happen off the event loop; the serving path only appends a
reference to the request's rows and output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import pandas as pd
from pydantic import JsonValue

from kiln.store.artifacts import ArtifactStore, safe_key

log = logging.getLogger("kiln.monitor")

BUFFER_ROWS = 50_000
"""Rows a deployment's log holds between two writes; sampled requests past it are
dropped (and counted)."""


class Output(Protocol):
    """A request's answer (:class:`kiln.serve.model.Output`)."""

    predictions: list[Any]
    probabilities: list[list[float]] | None
    labels: list[Any] | None


Inputs = list[dict[str, Any]] | pd.DataFrame
"""A request's rows as it came (``{column: value}`` each), or its checked frame."""


@dataclass(eq=False)
class _Entry:
    time: float  # epoch seconds
    version: int
    inputs: Inputs
    output: Output


@dataclass
class _DeploymentLog:
    prefix: str
    entries: list[_Entry] = field(default_factory=list)
    rows: int = 0  # rows in ``entries``
    # batches taken by a flush and not yet written: still readable, so a read never
    # misses records on their way to the store
    writing: list[list[_Entry]] = field(default_factory=list)
    written: int | None = None  # bytes under ``prefix`` (None: not read from the store yet)
    full: bool = False
    dropped: int = 0


@dataclass(frozen=True)
class LogStatus:
    """A deployment's prediction log: its sampling, cap and bytes written so far."""

    sample: float  # the share of requests kept
    max_bytes: int
    written_bytes: int | None  # None: nothing read from the store or written yet
    full: bool  # the cap is reached: no more records are written


def prefix_of(project: str, deployment: str) -> str:
    return safe_key("projects", project, "deployments", deployment, "predictions")


class PredictionLog:
    """Sampled, size-capped records of the predictions of every deployment."""

    def __init__(
        self,
        store: ArtifactStore,
        *,
        sample: float,
        max_bytes: int,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.sample = sample
        self.max_bytes = max_bytes
        self.rng = rng
        self.clock = clock
        self._logs: dict[tuple[str, str], _DeploymentLog] = {}
        # one write at a time (a flush, and one on close); a read sees memory and
        # store between two writes
        self._writing = threading.Lock()

    def _log(self, project: str, deployment: str) -> _DeploymentLog:
        entry = self._logs.get((project, deployment))
        if entry is None:
            entry = self._logs[(project, deployment)] = _DeploymentLog(
                prefix_of(project, deployment)
            )
        return entry

    def offer(
        self,
        project: str,
        deployment: str,
        version: int,
        inputs: Inputs,
        output: Output,
    ) -> None:
        """Keep this answered request with probability ``sample`` (serving path)."""
        if self.sample <= 0 or (self.sample < 1 and self.rng() >= self.sample):
            return
        dlog = self._log(project, deployment)
        if dlog.full:
            return
        n = len(inputs)
        if dlog.rows + n > BUFFER_ROWS:
            dlog.dropped += 1
            return
        dlog.entries.append(_Entry(self.clock(), version, inputs, output))
        dlog.rows += n

    async def flush(self) -> None:
        """Write what the buffers hold (in a thread)."""
        work = []
        for dlog in self._logs.values():
            if dlog.entries:
                work.append((dlog, dlog.entries, dlog.dropped))
                dlog.writing.append(dlog.entries)
                dlog.entries, dlog.rows, dlog.dropped = [], 0, 0
        if work:
            await asyncio.to_thread(self._write_all, work)

    def _write_all(self, work: list[tuple[_DeploymentLog, list[_Entry], int]]) -> None:
        with self._writing:
            for dlog, entries, dropped in work:
                try:
                    self._write(dlog, entries, dropped)
                except Exception as exc:  # a store error loses this sample, not the server
                    log.error("prediction log %s could not be written: %s", dlog.prefix, exc)
                finally:  # in place: the event loop may be appending the next batch
                    for i, batch in enumerate(dlog.writing):
                        if batch is entries:
                            del dlog.writing[i]
                            break

    def _write(self, dlog: _DeploymentLog, entries: list[_Entry], dropped: int) -> None:
        if dropped:
            log.warning(
                "prediction log %s: %d sampled requests dropped (buffer full)", dlog.prefix, dropped
            )
        if dlog.full:
            return
        if dlog.written is None:
            dlog.written = self.store.total_size(dlog.prefix)
        lines: list[bytes] = []
        size = 0
        for entry in entries:
            line = (
                json.dumps(_record(entry), default=_plain, separators=(",", ":")) + "\n"
            ).encode()
            if dlog.written + size + len(line) > self.max_bytes:
                dlog.full = True
                log.warning(
                    "prediction log %s reached its cap of %.3g MB: no more records are written",
                    dlog.prefix,
                    self.max_bytes / (1 << 20),
                )
                break
            lines.append(line)
            size += len(line)
        if not lines:
            return
        when = datetime.fromtimestamp(entries[0].time, UTC)
        name = f"{when:%H%M%S}-{when.microsecond:06d}{secrets.token_hex(3)}.jsonl"
        key = f"{dlog.prefix}/{safe_key(f'{when:%Y-%m-%d}', name)}"
        self.store.put_bytes(key, b"".join(lines))
        dlog.written += size

    def read(self, project: str, deployment: str, limit: int) -> list[dict[str, JsonValue]]:
        """The newest ``limit`` records, newest first: those still in memory, then the
        newest files' (blocking: run in a thread)."""
        with self._writing:
            return self._read(project, deployment, limit)

    def _read(self, project: str, deployment: str, limit: int) -> list[dict[str, JsonValue]]:
        out: list[dict[str, JsonValue]] = []
        dlog = self._logs.get((project, deployment))
        if dlog is not None:
            in_memory = [e for batch in list(dlog.writing) for e in batch] + list(dlog.entries)
            for entry in reversed(in_memory):
                if len(out) >= limit:
                    return out
                out.append(json.loads(json.dumps(_record(entry), default=_plain)))
        prefix = dlog.prefix if dlog is not None else prefix_of(project, deployment)
        for key in reversed(self.store.list(prefix)):
            if len(out) >= limit:
                break
            lines = self.store.get_bytes(key).decode().splitlines()
            for line in reversed(lines):
                if len(out) >= limit:
                    break
                if line.strip():
                    out.append(json.loads(line))
        return out

    def status(self, project: str, deployment: str) -> LogStatus:
        dlog = self._logs.get((project, deployment))
        return LogStatus(
            sample=self.sample,
            max_bytes=self.max_bytes,
            written_bytes=dlog.written if dlog is not None else None,
            full=bool(dlog and dlog.full),
        )


def _record(entry: _Entry) -> dict[str, Any]:
    inputs = entry.inputs
    rows = inputs.to_dict("records") if isinstance(inputs, pd.DataFrame) else inputs
    out: dict[str, Any] = {
        "time": datetime.fromtimestamp(entry.time, UTC).isoformat(timespec="milliseconds"),
        "version": entry.version,
        "inputs": rows,
        "predictions": entry.output.predictions,
    }
    if entry.output.probabilities is not None:
        out["probabilities"] = entry.output.probabilities
        out["labels"] = entry.output.labels
    return out


def _plain(value: Any) -> Any:
    """JSON for what ``json`` does not know: numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
