"""Checkpoints: the full training state after every epoch, for ``--resume``.

A checkpoint is a safetensors file: every tensor of the state (weights, optimizer
moments, RNG states) under its own name, and the rest of the state (numbers, strings,
lists, dicts, tuples) as JSON in one more uint8 tensor. Reading one parses JSON and raw
tensor bytes only: nothing is unpickled and no code from the file can run. The local
store writes to a temporary file and renames it, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, Protocol, TypedDict, cast

import numpy as np

from kiln.errors import TrainingError

if TYPE_CHECKING:
    import torch

SKELETON = "__kiln_state__"  # the tensor holding the JSON of everything but the tensors

EpochEntry = dict[str, float]
"""One epoch's logs in a run's history: ``epoch``, ``train_loss``, ``lr``, ``val_*``."""

TorchStateDict = dict[str, Any]
"""An optimizer's or scheduler's ``state_dict()``: torch's own nested shape, kept as is."""


class ProgressState(TypedDict):
    """:class:`Progress` as a checkpoint holds it."""

    epoch: int  # the last completed epoch (0: none)
    history: list[EpochEntry]
    best_value: float | None  # early stopping's best monitored value so far
    best_epoch: int | None
    best_state: dict[str, torch.Tensor] | None  # the best epoch's weights, when kept
    bad_epochs: int  # epochs since the best one
    stopped_early: NotRequired[bool]  # absent from checkpoints older than the field


class CheckpointState(ProgressState):
    """The full training state after an epoch, as a :class:`CheckpointStore` keeps it."""

    run_id: str  # the spec and data it belongs to: a resume of another run is refused
    model: dict[str, torch.Tensor]  # the weights
    optimizer: TorchStateDict
    scheduler: TorchStateDict  # {} when the run has no schedule
    shuffle_rng: torch.Tensor  # the batch-shuffling generator's state
    torch_rng: torch.Tensor  # the global CPU RNG (dropout)
    cuda_rng: list[torch.Tensor]  # one state per CUDA device; [] off CUDA


class CheckpointStore(Protocol):
    """Where a training run keeps its latest state."""

    def save(self, state: CheckpointState) -> None: ...

    def load(self) -> CheckpointState | None: ...

    def clear(self) -> None: ...


@dataclass
class Progress:
    """Where a run stands after its last completed epoch: the part of a checkpoint
    beside the weights, optimizer, schedule and RNG states (early stopping's count
    and best weights, and the history so far)."""

    epoch: int = 0
    history: list[EpochEntry] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    stopped_early: bool = False

    def to_checkpoint(self) -> ProgressState:
        return {
            "epoch": self.epoch,
            "history": self.history,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
        }

    @classmethod
    def from_checkpoint(cls, state: ProgressState) -> Progress:
        return cls(
            epoch=state["epoch"],
            history=list(state["history"]),
            best_value=state["best_value"],
            best_epoch=state["best_epoch"],
            best_state=state["best_state"],
            bad_epochs=state["bad_epochs"],
            stopped_early=bool(state.get("stopped_early", False)),
        )


def encode_state(state: Mapping[str, object]) -> bytes:
    """``state`` as safetensors bytes (see the module docstring).

    Dicts keep their key types (the optimizer's are ints) and tuples stay tuples, so
    ``decode_state`` gives back what ``load_state_dict`` was given.
    """
    import torch  # here: the API server reads job code without loading torch
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def tensor(value: torch.Tensor) -> dict[str, str]:
        t = value.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in storages:  # tied weights: safetensors wants one owner
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        name = f"t{len(tensors)}"
        tensors[name] = t
        return {"tensor": name}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return tensor(value)
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {"dict": {k: walk(v) for k, v in value.items()}}
            return {"items": [[walk(k), walk(v)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"tuple": [walk(v) for v in value]}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TrainingError(f"a checkpoint cannot hold {type(value).__name__!r} values")

    skeleton = json.dumps(walk(state)).encode()
    tensors[SKELETON] = torch.frombuffer(bytearray(skeleton), dtype=torch.uint8)
    data: bytes = save(tensors)
    return data


def decode_state(data: bytes, where: object) -> dict[str, object]:
    """The state ``encode_state`` wrote; a TrainingError naming ``where`` if unreadable."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        skeleton = json.loads(tensors.pop(SKELETON).numpy().tobytes())

        def build(node: Any) -> Any:
            if isinstance(node, list):
                return [build(v) for v in node]
            if not isinstance(node, dict):
                return node
            ((kind, body),) = node.items()
            if kind == "tensor":
                return tensors[body]
            if kind == "dict":
                return {k: build(v) for k, v in body.items()}
            if kind == "items":
                return {build(k): build(v) for k, v in body}
            if kind == "tuple":
                return tuple(build(v) for v in body)
            raise ValueError(f"unknown node {kind!r}")

        state = build(skeleton)
        if not isinstance(state, dict):
            raise ValueError("not a training state")
    except Exception as exc:
        raise TrainingError(f"checkpoint {where} cannot be read: {exc}") from None
    return state


def as_checkpoint(state: dict[str, object]) -> CheckpointState:
    """A decoded state as the :class:`CheckpointState` it was saved as: the codec gives
    back exactly what ``save`` was given (a file of another run fails ``_restore``'s
    ``run_id`` check)."""
    return cast(CheckpointState, state)


class DirCheckpoints:
    """Keeps ``last.pt`` (a safetensors file, by its old name) in a local directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "last.pt"

    def save(self, state: CheckpointState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(encode_state(state))
        os.replace(tmp, self.path)

    def load(self) -> CheckpointState | None:
        if not self.path.is_file():
            return None
        return as_checkpoint(decode_state(self.path.read_bytes(), self.path))

    def clear(self) -> None:
        for p in (self.path, self.path.with_suffix(".tmp")):
            p.unlink(missing_ok=True)
        if self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()
