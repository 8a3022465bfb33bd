"""The channel between a job's driver (the kiln worker process) and its Ray Train
workers: a small Ray actor the driver creates for one training run.

Rank 0 puts its callbacks' events here (epochs, batches, the end) and its checkpoints;
every worker reads the latest checkpoint here when it starts (so a worker group that
Ray restarted after a lost node resumes from it) and asks whether the driver wants
the run stopped (a cancelled job). The driver drains the events and stores each
checkpoint in kiln's artifact store: the workers never hold the store's credentials.
"""

from __future__ import annotations

from typing import Any, Literal

from typing_extensions import TypedDict

EventKind = Literal[
    "train_start", "epoch_start", "batches", "tokens", "epoch_end", "checkpoint", "train_end"
]


class Event(TypedDict):
    """One callback call of rank 0, in the order it happened."""

    kind: EventKind
    value: Any  # the callback's argument (epochs/start, batches, logs, summary)


class Channel:
    """The actor's class (``ray.remote(num_cpus=0)(Channel)``); each method is one call."""

    def __init__(self, checkpoint: Any = None) -> None:
        self._events: list[Event] = []
        self._checkpoint = checkpoint  # the latest CheckpointState (None: none yet)
        self._stopped = False
        self._workers: dict[int, dict[str, Any]] = {}
        self._result: Any = None
        self._error: dict[str, Any] | None = None

    def put(self, kind: EventKind, value: Any) -> None:
        self._events.append({"kind": kind, "value": value})

    def drain(self) -> tuple[list[Event], list[dict[str, Any]], dict[str, Any] | None]:
        """The events since the last drain, every worker that said hello, and the kiln
        error a worker failed with (None: none)."""
        events, self._events = self._events, []
        return events, [self._workers[r] for r in sorted(self._workers)], self._error

    def save(self, state: Any) -> None:
        """Rank 0's checkpoint after an epoch (the driver stores it on the next drain)."""
        self._checkpoint = state
        self._events.append({"kind": "checkpoint", "value": None})

    def checkpoint(self) -> Any:
        return self._checkpoint

    def has_checkpoint(self) -> bool:
        return self._checkpoint is not None

    def hello(self, worker: dict[str, Any]) -> None:
        """A worker's placement (rank, node, pid, resources), sent when it starts."""
        self._workers[int(worker["rank"])] = worker

    def stop(self) -> None:
        self._stopped = True

    def stopped(self) -> bool:
        return self._stopped

    def finish(self, result: Any) -> None:
        """Rank 0's trained weights and FitResult."""
        self._result = result

    def result(self) -> Any:
        return self._result

    def fail(self, error: dict[str, Any]) -> None:
        """A worker's kiln error (code, message, field): what the job fails with."""
        if self._error is None:
            self._error = error

    def error(self) -> dict[str, Any] | None:
        return self._error
