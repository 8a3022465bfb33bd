"""Parquet datasets: a directory, a glob or an ``s3://`` prefix of Parquet files.

:func:`discover` lists a source's files (sorted, so every process agrees on one row
order) and opens them as one ``pyarrow.dataset``; ``k=v/`` folders, as Spark and
Hadoop tools write them, become columns (hive partitioning). :func:`read_dataset`
reads such a source whole (non-streaming specs); streaming reads it a row group at a
time (:mod:`kiln.data.stream`). Remote sources go through fsspec (s3fs for ``s3://``).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pandas as pd

from kiln.errors import DataError, NotFoundError

PARQUET_SUFFIXES = (".parquet", ".pq")
_GLOB_CHARS = "*?["
_FOOTER_TAIL = 8  # the footer's length (4 bytes, little-endian) then b"PAR1"


def is_dataset_source(source: str) -> bool:
    """Whether ``source`` names a Parquet dataset rather than one table file: a local
    directory holding Parquet files, a glob, or a URI without a table suffix (a prefix)."""
    if source.startswith("sklearn:"):
        return False
    if "://" not in source and os.path.isfile(source):
        return False  # a file whose name holds [, ? or * is that file, not a glob
    if any(c in source for c in _GLOB_CHARS):
        return True
    if "://" in source:
        return not _has_table_suffix(source)
    return os.path.isdir(source) and holds_parquet(source)


def holds_parquet(directory: str) -> bool:
    """A local directory with a Parquet file somewhere under it (stops at the first)."""
    for _, _, names in os.walk(directory):
        if any(n.lower().endswith(PARQUET_SUFFIXES) for n in names):
            return True
    return False


def _has_table_suffix(source: str) -> bool:
    from kiln.data.sources import table_format

    try:
        table_format(source)
    except DataError:
        return False
    return True


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group: the unit of streaming reads, shuffling and sharding.

    ``start`` is the global number of its first row in the source's canonical order
    (files sorted by path, row groups in file order).
    """

    file: int  # index into ParquetSource.files
    index: int  # row group within that file
    start: int
    rows: int


@dataclass(frozen=True)
class ParquetSource:
    """A discovered Parquet dataset: its files (sorted), their filesystem and root.

    ``root`` is the folder paths are relative to (fingerprint) and partitions are read
    from (hive ``k=v`` folders below it).
    """

    source: str
    files: list[str]
    filesystem: Any  # a pyarrow.fs.FileSystem (local) or an fsspec filesystem
    root: str

    @cached_property
    def dataset(self) -> Any:
        """The files as one ``pyarrow.dataset.Dataset`` (hive partitions as columns)."""
        import pyarrow.dataset as ds

        try:
            return ds.dataset(
                self.files,
                filesystem=self.filesystem,
                format="parquet",
                partitioning=ds.HivePartitioning.discover(infer_dictionary=False),
                partition_base_dir=self.root,
            )
        except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            raise DataError(
                f"cannot read {self.source} as Parquet: {_first_line(exc)}", field="data.source"
            ) from None

    @property
    def columns(self) -> list[str]:
        """Every column, partition columns included."""
        return [str(n) for n in self.dataset.schema.names]

    @cached_property
    def fragments(self) -> list[Any]:
        """One ``ParquetFileFragment`` per file, in ``files`` order."""
        by_path = {f.path: f for f in self.dataset.get_fragments()}
        return [by_path[p] for p in self.files]

    @cached_property
    def row_groups(self) -> list[RowGroup]:
        """Every row group of every file, in canonical order, from the files' footers."""
        groups: list[RowGroup] = []
        start = 0
        for i, fragment in enumerate(self.fragments):
            for rg in fragment.row_groups:
                groups.append(RowGroup(file=i, index=rg.id, start=start, rows=rg.num_rows))
                start += rg.num_rows
        return groups

    @property
    def num_rows(self) -> int:
        return sum(g.rows for g in self.row_groups)

    def read_group(self, group: RowGroup, columns: list[str], batch_rows: int) -> Any:
        """Iterator of ``pyarrow.RecordBatch`` (at most ``batch_rows`` rows each) of one
        row group's ``columns``, partition columns filled in."""
        fragment = self.fragments[group.file].subset(row_group_ids=[group.index])
        return fragment.to_batches(
            schema=self.dataset.schema, columns=columns, batch_size=batch_rows
        )

    def head(self, rows: int) -> pd.DataFrame:
        """The first ``rows`` rows (every column), read a row group at a time (a
        dataset-wide ``head`` reads ahead several whole files)."""
        import pyarrow as pa

        batches: list[Any] = []
        held = 0
        for group in self.row_groups:
            for batch in self.read_group(group, self.columns, min(rows, 65_536)):
                batches.append(batch.slice(0, rows - held))
                held += batches[-1].num_rows
                if held >= rows:
                    break
            if held >= rows:
                break
        frame: pd.DataFrame = pa.Table.from_batches(batches, self.dataset.schema).to_pandas()
        return frame

    def fingerprint(self) -> str:
        """sha256 over (relative path, size, footer bytes) of every file: the data's
        identity without reading it (a rewritten file changes its footer)."""
        digest = hashlib.sha256()
        for path in self.files:
            size, footer = _footer(self.filesystem, path)
            rel = os.path.relpath(path, self.root) if self.root else path
            digest.update(f"{rel}\x1f{size}\x1f".encode())
            digest.update(footer)
        return "sha256:" + digest.hexdigest()


def discover(source: str) -> ParquetSource:
    """The Parquet files of ``source`` (one file, a directory searched recursively, a
    glob, or a URI prefix), skipping hidden and ``_``-prefixed files (``_SUCCESS``, ``.crc``).

    NotFoundError when nothing matches; DataError when the files are not Parquet.
    """
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    path = path.rstrip("/")
    glob = any(c in path for c in _GLOB_CHARS)
    try:
        if glob:
            found = [str(p) for p in fs.glob(path)]
            root = _glob_root(path)
        elif fs.isdir(path):
            found, root = [str(p) for p in fs.find(path)], path
        else:  # one file (or nothing there)
            found = [path] if fs.isfile(path) else []
            root = path.rsplit("/", 1)[0] if "/" in path else ""
    except (FileNotFoundError, PermissionError, OSError) as exc:
        raise NotFoundError(
            f"cannot list {source}: {_first_line(exc)}", field="data.source"
        ) from None
    files = sorted(p for p in found if _is_data_file(p))
    if not files:
        raise NotFoundError(f"no Parquet files found at {source}", field="data.source")
    return ParquetSource(source=source, files=files, filesystem=_arrow_fs(fs), root=root)


def read_dataset(source: str) -> pd.DataFrame:
    """The whole dataset as one frame (partition columns included)."""
    src = discover(source)
    try:
        frame: pd.DataFrame = src.dataset.to_table().to_pandas()
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot read {source} as Parquet: {_first_line(exc)}", field="data.source"
        ) from None
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _is_data_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return not name.startswith(("_", ".")) and name.lower().endswith(PARQUET_SUFFIXES)


def _glob_root(pattern: str) -> str:
    """The folder above a glob's first wildcard (where partition folders start)."""
    first = min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)
    return pattern[:first].rsplit("/", 1)[0] if "/" in pattern[:first] else ""


def _arrow_fs(fs: Any) -> Any:
    """pyarrow's own local filesystem for local paths (no Python in the read path);
    remote filesystems stay fsspec (pyarrow wraps them)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem()
    return fs


def _footer(filesystem: Any, path: str) -> tuple[int, bytes]:
    """(file size, its Parquet footer bytes); DataError for a file that is not Parquet."""
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.FileSystem):
        with filesystem.open_input_file(path) as fh:
            return _read_footer(fh, int(fh.size()), path)
    with filesystem.open(path, "rb") as fh:
        return _read_footer(fh, int(filesystem.size(path)), path)


def _read_footer(fh: Any, size: int, path: str) -> tuple[int, bytes]:
    if size < 12:
        raise DataError(f"{path} is not a Parquet file (too short)", field="data.source")
    fh.seek(size - _FOOTER_TAIL)
    tail = fh.read(_FOOTER_TAIL)
    (length,) = struct.unpack("<i", tail[:4])
    if tail[4:] != b"PAR1" or not 0 < length <= size - 12:
        raise DataError(f"{path} is not a Parquet file", field="data.source")
    fh.seek(size - _FOOTER_TAIL - length)
    return size, bytes(fh.read(length))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
