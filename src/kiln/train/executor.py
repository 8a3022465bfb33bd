"""Where the training engine runs: in this process (no executor), or handed to an
:class:`Executor`, e.g. a Ray cluster (:mod:`kiln.jobs.executors.ray`).

The engine (:func:`kiln.train.loop.fit_model`) hands a run to the executor when the
spec asks for ``train.resources`` and the caller passed one. The executor runs the
same function on each of its workers with a :class:`~kiln.train.loop.DataParallel`
place, relays the workers' epochs, checkpoints and end to the caller's callbacks and
checkpoint store (so a job records and checkpoints exactly as in-process), and puts
the trained weights back into the caller's model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import nn

    from kiln.spec.train import TrainSpec
    from kiln.train.callbacks import Callback
    from kiln.train.checkpoint import CheckpointStore
    from kiln.train.loop import FitResult, TensorData


@dataclass(frozen=True)
class FitRequest:
    """Everything :func:`~kiln.train.loop.fit_model` takes besides the model, the
    callbacks and the checkpoints (those stay with the caller)."""

    data: TensorData
    train: TrainSpec
    task: str
    loss: str
    target_scale: float
    run_id: str
    augment: nn.Module | None
    criterion: nn.Module | None


class Executor(Protocol):
    """Runs a training run somewhere else and reports it as if it ran here."""

    def fit(
        self,
        model: nn.Module,
        request: FitRequest,
        *,
        callbacks: Sequence[Callback],
        checkpoints: CheckpointStore | None,
        resume: bool,
    ) -> FitResult:
        """Train ``model`` (its weights replaced by the trained ones) per ``request``;
        callbacks hear every epoch; ``checkpoints`` receive every epoch's state."""
        ...
