"""Checkpoints: the full training state after every epoch, for ``--resume``.

A checkpoint holds tensors, numbers and strings only; it is written with
``torch.save`` to a temporary file and renamed (a crash never leaves half a file),
and read back with ``torch.load(weights_only=True)``, which refuses anything that
would need unpickling code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch

from kiln.errors import TrainingError


class CheckpointStore(Protocol):
    """Where a training run keeps its latest state."""

    def save(self, state: dict[str, Any]) -> None: ...

    def load(self) -> dict[str, Any] | None: ...

    def clear(self) -> None: ...


class DirCheckpoints:
    """Keeps ``last.pt`` in a local directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "last.pt"

    def save(self, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrainingError(f"checkpoint {self.path} cannot be read: {exc}") from None
        return state

    def clear(self) -> None:
        for p in (self.path, self.path.with_suffix(".tmp")):
            p.unlink(missing_ok=True)
        if self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()
