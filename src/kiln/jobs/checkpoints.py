"""Training checkpoints kept in the artifact store, so any worker can resume a job."""

from __future__ import annotations

import io
from typing import Any

from kiln.errors import NotFoundError, TrainingError
from kiln.store.artifacts import ArtifactStore


class ArtifactCheckpoints:
    """A :class:`kiln.train.checkpoint.CheckpointStore` over one artifact-store key.

    Written with ``torch.save`` and read with ``torch.load(weights_only=True)``:
    tensors, numbers and strings only, never code.
    """

    def __init__(self, store: ArtifactStore, key: str) -> None:
        self.store = store
        self.key = key

    def save(self, state: dict[str, Any]) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.store.put_bytes(self.key, buffer.getvalue())

    def load(self) -> dict[str, Any] | None:
        import torch

        try:
            data = self.store.get_bytes(self.key)
        except NotFoundError:
            return None
        try:
            state: dict[str, Any] = torch.load(
                io.BytesIO(data), map_location="cpu", weights_only=True
            )
        except Exception as exc:
            raise TrainingError(f"checkpoint {self.key} cannot be read: {exc}") from None
        return state

    def exists(self) -> bool:
        return self.store.exists(self.key)

    def clear(self) -> None:
        self.store.delete(self.key)
