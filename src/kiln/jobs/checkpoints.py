"""Training checkpoints kept in the artifact store, so any worker can resume a job."""

from __future__ import annotations

from kiln.errors import NotFoundError
from kiln.store.artifacts import ArtifactStore
from kiln.train.checkpoint import CheckpointState, as_checkpoint, decode_state, encode_state


class ArtifactCheckpoints:
    """A :class:`kiln.train.checkpoint.CheckpointStore` over one artifact-store key, in
    the same pickle-free format as local checkpoints (``encode_state``)."""

    def __init__(self, store: ArtifactStore, key: str) -> None:
        self.store = store
        self.key = key

    def save(self, state: CheckpointState) -> None:
        self.store.put_bytes(self.key, encode_state(state))

    def load(self) -> CheckpointState | None:
        try:
            data = self.store.get_bytes(self.key)
        except NotFoundError:
            return None
        return as_checkpoint(decode_state(data, self.key))

    def exists(self) -> bool:
        return self.store.exists(self.key)

    def clear(self) -> None:
        self.store.delete(self.key)
