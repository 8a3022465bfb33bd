"""Streaming a Parquet dataset: the hash split, raw chunks per split, training batches.

Nothing here holds the whole table. A row's split is decided by a stable hash of its
key (``data.split.key``) or of its global row number (:class:`HashSplit`), so every
pass, process and machine agrees on it without a shuffle of the whole set.
:class:`StreamTable` reads the table as pandas chunks (each row with its split), a row
group at a time;
:class:`ParquetBatches` turns the training split into shuffled, encoded micro-batches
(the ``BatchStream`` of :mod:`kiln.train.loop`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from kiln.data.parquet import ParquetSource, RowGroup
from kiln.data.preprocess import Preprocessor
from kiln.errors import DataError

Part = Literal["train", "val", "test"]
PART_CODES: dict[Part, int] = {"train": 0, "val": 1, "test": 2}

READ_ROWS = 16_384  # rows per record batch read from a row group
SHUFFLE_BATCHES = 8  # the shuffle buffer holds this many micro-batches (and >= 2 reads)
_TWO64 = float(2**64)


@dataclass(frozen=True)
class HashSplit:
    """Row -> split by ``u = hash(key or row number, seed) / 2**64``: test if
    ``u < test``, val if ``u < test + val``, else train.

    pandas' ``hash_array`` is fixed (no per-process salt), so the split is the same in
    every process and on every machine; the seed enters through a second mixing round.
    """

    test: float
    val: float
    seed: int
    key: str | None = None

    def uniform(self, keys: np.ndarray) -> np.ndarray:
        """Each key's stable position in [0, 1) (float64, shape (N,))."""
        salt = np.uint64(int.from_bytes(_seed_bytes(self.seed), "little"))
        first = pd.util.hash_array(np.asarray(keys), hash_key=_seed_bytes(self.seed).hex())
        mixed = pd.util.hash_array(first ^ salt)
        return mixed.astype(np.float64) / _TWO64

    def codes(self, keys: np.ndarray) -> np.ndarray:
        """Part codes (:data:`PART_CODES`, int8 (N,)) of rows with these keys."""
        u = self.uniform(keys)
        out = np.zeros(len(u), dtype=np.int8)
        out[u < self.test + self.val] = PART_CODES["val"]
        out[u < self.test] = PART_CODES["test"]
        return out

    def frame_codes(self, frame: pd.DataFrame, start: int) -> np.ndarray:
        """Part codes of ``frame``'s rows, the first being global row ``start``."""
        if self.key is not None:
            return self.codes(_canonical_keys(frame[self.key]))
        return self.codes(np.arange(start, start + len(frame), dtype=np.int64))


def _canonical_keys(keys: pd.Series) -> np.ndarray:
    """Split keys in one form whatever the batch they were read in: text, with whole
    numbers as integers (a batch holding a null reads an int64 column as float64) and
    every null as the empty string."""
    text = keys.astype("string").fillna("")
    if pd.api.types.is_float_dtype(keys):  # value by value: 7.0 is the integer 7
        whole = keys.notna() & (keys == np.floor(keys)) & (keys.abs() < 2**63)
        text[whole] = keys[whole].astype("int64").astype("string")
    return text.to_numpy(dtype=object)


def _seed_bytes(seed: int) -> bytes:
    return hashlib.blake2b(str(seed).encode(), digest_size=8).digest()


@dataclass(frozen=True)
class Chunk:
    """One record batch of a row group: its rows (all parts) indexed by global row
    number (so errors name the row), their part codes, and which rows are kept (a
    non-empty target; under ``missing: drop`` no empty feature either)."""

    group: int  # position in StreamTable.groups
    frame: pd.DataFrame
    parts: np.ndarray  # int8 (N,), PART_CODES
    kept: np.ndarray  # bool (N,)

    def rows(self, part: Part) -> pd.DataFrame:
        """The kept rows of ``part``."""
        mask = self.kept & (self.parts == PART_CODES[part])
        return self.frame if mask.all() else self.frame[mask]

    def dropped(self, part: Part) -> int:
        """Rows of ``part`` left out (empty target or feature)."""
        return int((~self.kept & (self.parts == PART_CODES[part])).sum())


@dataclass(frozen=True)
class StreamTable:
    """A streaming dataset as the recipe reads it: the source, its row groups, the
    columns read and the split."""

    source: ParquetSource
    features: list[str]
    target: str
    split: HashSplit
    drop_missing_features: bool = False  # missing: drop

    @classmethod
    def open(
        cls,
        source: ParquetSource,
        features: list[str],
        target: str,
        split: HashSplit,
        drop_missing_features: bool = False,
    ) -> StreamTable:
        """The table, its columns checked against the source (DataError naming them)."""
        missing = [c for c in [*features, target] if c not in source.columns]
        if missing:
            raise DataError(
                f"column(s) {missing} not in the data; columns are {source.columns}",
                field="data.target" if target in missing else "data.features",
            )
        if split.key is not None and split.key not in source.columns:
            raise DataError(
                f"split key {split.key!r} is not in the data; columns are {source.columns}",
                field="data.split.key",
            )
        return cls(source, features, target, split, drop_missing_features)

    @property
    def groups(self) -> list[RowGroup]:
        return self.source.row_groups

    @property
    def columns(self) -> list[str]:
        """What is read: features, target, and the split key (once each)."""
        cols = [*self.features, self.target]
        if self.split.key is not None and self.split.key not in cols:
            cols.append(self.split.key)
        return cols

    def chunks(self, order: list[int] | None = None) -> Iterator[Chunk]:
        """Every row, a record batch at a time, row group by row group in ``order``
        (positions in :attr:`groups`; default: canonical order)."""
        for pos in order if order is not None else range(len(self.groups)):
            group = self.groups[pos]
            start = group.start
            for batch in self.source.read_group(group, self.columns, READ_ROWS):
                frame = batch.to_pandas()
                frame.index = pd.RangeIndex(start, start + len(frame))
                parts = self.split.frame_codes(frame, start)
                start += len(frame)
                kept = frame[self.target].notna().to_numpy()
                if self.drop_missing_features:
                    kept = kept & frame[self.features].notna().all(axis=1).to_numpy()
                yield Chunk(pos, frame, parts, kept)


def split_frame(table: StreamTable, part: Part, cap: int) -> pd.DataFrame | None:
    """Up to ``cap`` kept rows of ``part`` (the first in canonical order) as one frame;
    None when the part is empty."""
    frames: list[pd.DataFrame] = []
    held = 0
    for chunk in table.chunks():
        if held >= cap:
            break
        take = chunk.rows(part).iloc[: cap - held]
        if len(take):
            frames.append(take)
            held += len(take)
    return pd.concat(frames) if frames else None


class ParquetBatches:
    """The training split as shuffled, encoded micro-batches (a ``BatchStream``).

    Shuffling is bounded: the row groups' order is permuted per epoch (from seed and
    epoch), and rows mix in a buffer of :data:`SHUFFLE_BATCHES` micro-batches. Memory
    is that buffer plus one record batch, whatever the table's size.
    """

    def __init__(
        self, table: StreamTable, preprocessor: Preprocessor, group_rows: dict[int, int]
    ) -> None:
        """``group_rows``: training rows kept per row group (position in
        ``table.groups`` of the unsharded table), counted by the fitting pass."""
        self.table = table
        self.preprocessor = preprocessor
        self.group_rows = group_rows
        self._positions = list(range(len(table.groups)))  # into the unsharded groups

    @property
    def rows(self) -> int:
        """Training rows of all shards (the epoch's length for progress and schedules)."""
        return sum(self.group_rows.values())

    @property
    def shard_rows(self) -> int:
        """Training rows of this shard."""
        return sum(self.group_rows.get(p, 0) for p in self._positions)

    def shard(self, rank: int, world: int) -> ParquetBatches:
        """Row groups ``rank::world`` of this stream (disjoint shards covering it)."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of world {world}")
        out = ParquetBatches(self.table, self.preprocessor, self.group_rows)
        out._positions = self._positions[rank::world]
        return out

    def batches(
        self, epoch: int, seed: int, batch: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches of ``batch`` rows (the last may be short): x (B, F) float32,
        y (B,) int64 | float32, every training row of the shard once."""
        rng = np.random.default_rng([seed, epoch])
        order = [self._positions[i] for i in rng.permutation(len(self._positions))]
        capacity = max(SHUFFLE_BATCHES * batch, 2 * READ_ROWS)
        buf_x: list[np.ndarray] = []
        buf_y: list[np.ndarray] = []
        held = 0
        for x, y in self.encoded(order):
            buf_x.append(x)
            buf_y.append(y)
            held += len(x)
            if held >= capacity:
                xs, ys = _shuffled(buf_x, buf_y, rng)
                # emit batches until half the buffer is left to mix with what comes next
                n_out = max(1, (held - capacity // 2) // batch) * batch
                yield from _cut(xs[:n_out], ys[:n_out], batch)
                buf_x, buf_y, held = [xs[n_out:]], [ys[n_out:]], held - n_out
        if held:
            xs, ys = _shuffled(buf_x, buf_y, rng)
            yield from _cut(xs, ys, batch)

    def encoded(self, order: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The training rows of row groups ``order``, encoded: (x (N, F), y (N,))."""
        pre, target = self.preprocessor, self.table.target
        for chunk in self.table.chunks(order):
            rows = chunk.rows("train")
            if len(rows):
                yield pre.transform(rows), pre.transform_target(rows[target])


def _shuffled(
    xs: list[np.ndarray], ys: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.concatenate(xs), np.concatenate(ys)
    perm = rng.permutation(len(x))
    return x[perm], y[perm]


def _cut(x: np.ndarray, y: np.ndarray, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), batch):
        yield torch.from_numpy(x[i : i + batch]), torch.from_numpy(y[i : i + batch])
