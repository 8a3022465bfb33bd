"""Training callbacks: a Rich progress bar and a resume hint for people, JSON lines
for machines.

The engine calls ``on_train_start`` once, ``on_batch_end`` after every batch (only
for callbacks that override it), ``on_epoch_end`` after every epoch with that epoch's
logs (an ``EpochEntry``: ``epoch``, ``train_loss``, ``lr``, ``val_*``, ``seconds``) and
``on_train_end`` once, with a :class:`TrainSummary`. Callbacks never change training.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypedDict

from kiln.train.checkpoint import DirCheckpoints, EpochEntry

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class TrainSummary(TypedDict, total=False):
    """How training ended, as ``on_train_end`` hears it.

    A finished run has ``epochs_run``, ``best_epoch``, ``stopped_early`` and
    ``seconds``; an interrupted one ``interrupted`` and ``epochs_run``; a failed one
    ``error`` (the exception's text) and ``epochs_run``.
    """

    epochs_run: int
    best_epoch: int | None
    stopped_early: bool
    seconds: float
    interrupted: bool
    error: str


class Callback:
    """No-op base; override what you need."""

    def on_train_start(self, epochs: int, start_epoch: int) -> None:
        """``start_epoch`` > 0 when resuming."""

    def on_epoch_start(self, batches: int) -> None:
        """Called before each epoch's ``batches`` micro-batches."""

    def on_batch_tokens(self, tokens: int) -> None:
        """Token inputs only: the real (non-padding) tokens of the micro-batch just done."""

    def on_batch_end(self) -> None:
        """Called after every batch; raising here stops training (a cancelled job)."""

    def on_epoch_end(self, logs: EpochEntry) -> None:
        """Called after each epoch's logs are final (and its checkpoint is written)."""

    def on_train_end(self, summary: TrainSummary) -> None:
        """Called once, with best epoch, epochs run and whether training stopped early."""


class RichProgress(Callback):
    """An epoch progress bar on stderr with live loss and validation metric; for token
    inputs (language models) a second bar over the epoch's batches with tokens/s."""

    def __init__(self, description: str = "training", metric: str | None = None) -> None:
        self.description = description
        self.metric = metric
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._batches = 0
        self._steps: TaskID | None = None
        self._tokens = 0
        self._epoch_started = 0.0

    def on_train_start(self, epochs: int, start_epoch: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            self.description, total=epochs, completed=start_epoch, status=""
        )

    def on_epoch_start(self, batches: int) -> None:
        import time

        self._batches, self._tokens = batches, 0
        self._epoch_started = time.perf_counter()
        if self._progress is not None and self._steps is not None:
            self._progress.reset(self._steps, total=batches, status="")

    def on_batch_tokens(self, tokens: int) -> None:
        import time

        if self._progress is None:
            return
        if self._steps is None:
            self._steps = self._progress.add_task("  batches", total=self._batches, status="")
        self._tokens += tokens
        rate = self._tokens / max(time.perf_counter() - self._epoch_started, 1e-9)
        self._progress.update(self._steps, advance=1, status=f"{rate:,.0f} tokens/s")

    def on_epoch_end(self, logs: EpochEntry) -> None:
        if self._progress is None or self._task is None:
            return
        parts = [f"loss {logs['train_loss']:.4f}"]
        if "val_loss" in logs:
            parts.append(f"val_loss {logs['val_loss']:.4f}")
        shown = self.metric if self.metric in logs else _headline(logs)
        if shown and shown != "val_loss":
            parts.append(f"{shown} {logs[shown]:.4f}")
        self._progress.update(self._task, completed=logs["epoch"], status="  ".join(parts))

    def on_train_end(self, summary: TrainSummary) -> None:
        if self._progress is not None:
            if summary.get("stopped_early") and self._task is not None:
                self._progress.update(self._task, total=summary["epochs_run"])
            self._progress.stop()
            self._progress = None


class ResumeHint(Callback):
    """Says on stderr where the checkpoint to continue from is, when training stops
    before its end (an error, Ctrl-C) and ``directory`` holds one; silent otherwise
    (a finished run's checkpoint is removed, and a run that failed before its first
    epoch has none)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._checkpoint = DirCheckpoints(directory).path

    def on_train_end(self, summary: TrainSummary) -> None:
        from rich.console import Console
        from rich.markup import escape

        stopped = "error" in summary or summary.get("interrupted", False)
        if stopped and self._checkpoint.is_file():
            Console(stderr=True).print(
                f"checkpoints: {escape(str(self.directory))} (continue with --resume)",
                highlight=False,
                soft_wrap=True,  # a long path stays on one line
            )


class JsonlLog(Callback):
    """One JSON object per line per event, to a file path or an open text stream."""

    def __init__(self, target: str | Path | IO[str]) -> None:
        self._own = isinstance(target, str | Path)
        self._fh: IO[str] = (
            open(target, "a", encoding="utf-8")  # noqa: SIM115 - closed in on_train_end
            if isinstance(target, str | Path)
            else target
        )

    def _write(self, event: str, payload: Mapping[str, object]) -> None:
        self._fh.write(json.dumps({"event": event, **payload}) + "\n")
        self._fh.flush()

    def on_train_start(self, epochs: int, start_epoch: int) -> None:
        self._write("start", {"epochs": epochs, "start_epoch": start_epoch})

    def on_epoch_end(self, logs: EpochEntry) -> None:
        self._write("epoch", logs)

    def on_train_end(self, summary: TrainSummary) -> None:
        self._write("end", summary)
        if self._own:
            self._fh.close()


def _headline(logs: EpochEntry) -> str | None:
    for key in ("val_accuracy", "val_rmse", "val_perplexity"):
        if key in logs:
            return key
    return None
