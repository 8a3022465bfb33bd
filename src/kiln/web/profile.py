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
from typing import Any, NotRequired, TypedDict

from kiln.store.artifacts import ArtifactStore
from kiln.store.tables import Dataset

CACHE_SIZE = 64
MAX_BYTES = 256 << 20  # bytes on disk; a larger table would hold a request for long
TOP_VALUES = 5


class ColumnProfile(TypedDict):
    """One column's statistics, as the dataset page reads them: ``min, max, mean, std``
    for a numeric column, ``top`` (``[[value, count], ...]``, most frequent first) for
    any other."""

    name: str
    dtype: str
    missing: int
    unique: int
    numeric: bool
    min: NotRequired[float]
    max: NotRequired[float]
    mean: NotRequired[float]
    std: NotRequired[float]
    top: NotRequired[list[tuple[str, int]]]


def profile_frame(frame: Any) -> list[ColumnProfile]:
    """Per column of a DataFrame, its :class:`ColumnProfile`."""
    import pandas as pd

    out: list[ColumnProfile] = []
    for name in frame.columns:
        values = frame[name]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        present = values.dropna()
        row: ColumnProfile = {
            "name": str(name),
            "dtype": str(values.dtype),
            "missing": int(values.isna().sum()),
            "unique": int(values.nunique(dropna=True)),
            "numeric": bool(numeric and len(present)),
        }
        if row["numeric"]:
            row["min"] = float(present.min())
            row["max"] = float(present.max())
            row["mean"] = float(present.mean())
            row["std"] = float(present.std()) if len(present) > 1 else 0.0
        else:
            counts = present.astype(str).value_counts().head(TOP_VALUES)
            row["top"] = [(str(k), int(v)) for k, v in counts.items()]
        out.append(row)
    return out


class ProfileCache:
    """``get(store, dataset)`` -> the dataset's column statistics, computed once."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[str, list[ColumnProfile]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, store: ArtifactStore, dataset: Dataset) -> list[ColumnProfile] | None:
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
