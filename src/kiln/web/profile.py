"""Column statistics of a stored dataset, computed on demand and kept in memory.

Datasets are immutable, so a profile computed once stays right: it is cached per
dataset id (the most recently used :data:`CACHE_SIZE` of them) for the life of the
process. Tables larger than :data:`MAX_BYTES` are not profiled, and a profile covers a
table's first :data:`kiln.data.scan.SAMPLE_ROWS` rows (a 200 MB ``.csv.gz`` may hold
gigabytes: the API process reads a bounded head of it, never the whole table).
"""

from __future__ import annotations

import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from kiln.store.artifacts import ArtifactStore
from kiln.store.tables import Dataset

CACHE_SIZE = 64
MAX_BYTES = 256 << 20  # bytes on disk; a larger table would hold a request for long
TOP_VALUES = 5


def profile_frame(frame: Any) -> list[dict[str, Any]]:
    """Per column: ``name, dtype, missing, unique`` and ``min, max, mean, std`` for a
    numeric column or ``top`` (``[[value, count], ...]``) for any other."""
    import pandas as pd

    out = []
    for name in frame.columns:
        values = frame[name]
        row: dict[str, Any] = {
            "name": str(name),
            "dtype": str(values.dtype),
            "missing": int(values.isna().sum()),
            "unique": int(values.nunique(dropna=True)),
        }
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        present = values.dropna()
        if numeric and len(present):
            row |= {
                "numeric": True,
                "min": float(present.min()),
                "max": float(present.max()),
                "mean": float(present.mean()),
                "std": float(present.std()) if len(present) > 1 else 0.0,
            }
        else:
            counts = present.astype(str).value_counts().head(TOP_VALUES)
            row |= {"numeric": False, "top": [[str(k), int(v)] for k, v in counts.items()]}
        out.append(row)
    return out


class ProfileCache:
    """``get(store, dataset)`` -> the dataset's column statistics, computed once."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, store: ArtifactStore, dataset: Dataset) -> list[dict[str, Any]] | None:
        """None when the table is too large to profile here."""
        from kiln.errors import DataError
        from kiln.store.datasets import IMAGE_FOLDER_FORMAT

        if dataset.format == IMAGE_FOLDER_FORMAT:
            raise DataError("an image folder has no table to profile", field="dataset_id")
        with self._lock:
            if dataset.id in self._entries:
                self._entries.move_to_end(dataset.id)
                return self._entries[dataset.id]
        if dataset.size_bytes > MAX_BYTES:
            return None
        stats = profile_frame(_read(store, dataset))
        with self._lock:
            self._entries[dataset.id] = stats
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return stats


def _read(store: ArtifactStore, dataset: Dataset) -> Any:
    from kiln.data.scan import read_head

    filename = dataset.artifact_key.rsplit("/", 1)[-1]  # keeps the format's suffix
    with tempfile.TemporaryDirectory(prefix="kiln-profile-") as tmp:
        local = Path(tmp) / filename
        store.get_file(dataset.artifact_key, local)
        return read_head(local, filename)
