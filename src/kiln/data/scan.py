"""Read an untrusted table within limits: count it, check it, keep a bounded sample.

``scan_table(path, filename, limits)`` is how a server looks at an upload before it
stores it. It checks what the file claims first (Parquet: the footer's rows, columns
and sizes, fixed-width columns at rows x width) and then streams the whole file once,
in chunks bounded in cells *and* bytes, so memory stays bounded whatever the file
holds: Parquet pages that expand to gigabytes, one string repeated through a Parquet
dictionary (counted at its expanded size, never expanded), a ``.csv.gz`` that inflates
a thousandfold, rows of a megabyte each, one endless line. Past a limit it raises
:class:`~kiln.errors.TooLargeError` naming the limit's variable; unreadable content is
a :class:`~kiln.errors.DataError` naming the file as sent. Column kinds come from the
first :data:`SAMPLE_ROWS` rows (fewer for wide or large rows); dtypes cover every chunk.

Text tables are parsed by the same pandas readers as :func:`kiln.data.sources.read_table`
(what training uses), chunk by chunk, so what passes here reads there.

Not bounded: a hand-made Parquet file whose page headers claim more than its footer
(pyarrow allocates a page as its header says), and a Parquet row group of more than
``CHUNK_BYTES`` of distinct text held in a few rows (a batch can then hold that group).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kiln.data.streams import (
    READ_SIZE,
    Metered,
    OverBudget,
    array_records,
    first_row,
    json_lines,
    open_decompressed,
    too_many_bytes,
)
from kiln.errors import DataError, TooLargeError
from kiln.settings import Settings

SAMPLE_ROWS = 10_000  # rows the column kinds are inferred from
SAMPLE_CELLS = 2_000_000  # ... fewer rows for a wide table
CHUNK_CELLS = 1_000_000  # cells parsed at a time; a chunk of strings is ~100 MB at most
CHUNK_BYTES = 64 << 20  # input bytes parsed at a time (whatever the row count)
SAMPLE_BYTES = 64 << 20  # ... and the sample's rows come from no more than this
_JSON_CHUNK_BYTES = 4 << 20  # parsed JSON takes several times its text's size
# bytes per value of a Parquet physical type once decoded (pandas: bool is a byte)
_WIDTH = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8}


@dataclass(frozen=True)
class Limits:
    """What one dataset may hold; the server's come from ``KILN_MAX_DATASET_*``."""

    rows: int = 10_000_000
    cells: int = 200_000_000  # rows x columns
    decompressed_bytes: int = 2048 << 20  # the table's bytes once decompressed/decoded

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(
            rows=settings.max_dataset_rows,
            cells=settings.max_dataset_cells,
            decompressed_bytes=int(settings.max_decompressed_mb * (1 << 20)),
        )


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    kind: str  # kiln.data.schema.ColumnKind, inferred from the sample
    dtype: str  # pandas dtype over the whole table (widened across chunks)


@dataclass(frozen=True)
class TableScan:
    """A table that passed: its format, exact row count, columns and first rows."""

    format: str
    rows: int
    columns: list[ColumnInfo]
    sample: pd.DataFrame = field(repr=False)


def read_head(path: Path, filename: str, rows: int = SAMPLE_ROWS) -> pd.DataFrame:
    """The first ``rows`` rows of a stored table (fewer for a wide one), read no further.

    For statistics a page can afford: memory is bounded like :func:`scan_table`'s.
    """
    unlimited = 1 << 62
    scan = _Scan(filename, Limits(rows=unlimited, cells=unlimited, decompressed_bytes=unlimited))
    scan.stop_at = rows
    with suppress(_Enough):
        _read(scan, path)
    if scan.sample is None:
        raise DataError(f"{filename} has no rows", field="file")
    return scan.sample


def scan_table(path: Path, filename: str, limits: Limits) -> TableScan:
    """Check ``path`` (named ``filename`` by its sender) against ``limits`` and describe it.

    Raises TooLargeError past a limit and DataError for anything kiln could not train
    on (unknown format, not UTF-8 text, unparseable, no rows, duplicate columns).
    """
    from kiln.data.schema import infer_kind

    scan = _Scan(filename, limits)
    _read(scan, path)
    if scan.rows == 0 or scan.sample is None:
        raise DataError(f"{filename} has no rows", field="file")
    names = [str(c) for c in scan.sample.columns]
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise DataError(f"{filename} has duplicate column names: {dupes}", field="file")
    sample = scan.sample
    sample.columns = names
    columns = [
        ColumnInfo(name=n, kind=infer_kind(sample.iloc[:, i]), dtype=scan.dtypes.get(n, "object"))
        for i, n in enumerate(names)
    ]
    return TableScan(format=scan.fmt, rows=scan.rows, columns=columns, sample=sample)


def _read(scan: _Scan, path: Path) -> None:
    """Stream ``path`` through ``scan``; read errors become DataErrors naming the file."""
    filename, fmt = scan.filename, scan.fmt
    try:
        if fmt == "parquet":
            if filename.lower().rsplit(".", 1)[-1] in ("gz", "bz2", "xz", "zst"):
                raise DataError(
                    f"{filename}: a compressed Parquet file; Parquet compresses its own pages, "
                    "upload the .parquet file",
                    field="file",
                )
            scan.parquet(path)
        elif fmt in ("csv", "tsv"):
            scan.csv(lambda: open_decompressed(path, filename), "\t" if fmt == "tsv" else ",")
        else:
            with open_decompressed(path, filename) as raw:  # one array of records?
                array = raw.read(4096).lstrip().startswith(b"[")
            with open_decompressed(path, filename) as raw:
                # a minified array is one long line: there its records are bounded instead
                stream = Metered(
                    raw, filename, scan.limits.decompressed_bytes, line_limit=not array
                )
                fh = io.BufferedReader(stream, READ_SIZE)
                scan.jsonl(array_records(fh, filename) if array else json_lines(fh))
                stream.finish()
    except (TooLargeError, DataError, _Enough):
        raise
    except (ValueError, UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read {filename} as {fmt}: {_first_line(exc)}", field="file"
        ) from None


class _Enough(Exception):  # noqa: N818 - read_head has its rows: stop reading
    pass


class _Scan:
    """Counts rows and cells chunk by chunk, keeps the first rows and the dtypes."""

    def __init__(self, filename: str, limits: Limits) -> None:
        from kiln.data.sources import table_format

        try:
            self.fmt = table_format(filename)
        except DataError as exc:
            raise DataError(exc.message, field="file") from None
        self.filename = filename
        self.limits = limits
        self.stop_at: int | None = None  # read_head: stop once the sample has this many
        self.reset()

    def reset(self) -> None:
        self.rows = 0
        self.sample: pd.DataFrame | None = None
        self.sampled_bytes = 0  # input bytes the sample's rows came from (about)
        self.dtypes: dict[str, str] = {}
        self._sample_rows = SAMPLE_ROWS

    def count(self, rows: int, columns: int) -> None:
        """``rows`` more rows of ``columns`` columns; raises past a limit."""
        self.rows += rows
        if self.rows > self.limits.rows:
            raise TooLargeError(
                f"{self.filename} has more than {self.limits.rows:,} rows, the limit "
                "(KILN_MAX_DATASET_ROWS)",
                field="file",
            )
        if self.rows * columns > self.limits.cells:
            raise TooLargeError(
                f"{self.filename} has more than {self.limits.cells:,} cells (rows x columns), "
                "the limit (KILN_MAX_DATASET_CELLS)",
                field="file",
            )

    def chunk_rows(self, columns: int) -> int:
        """Rows per chunk for a table this wide (and the sample's size)."""
        self.count(0, max(columns, 1))
        rows = self.stop_at or SAMPLE_ROWS
        self._sample_rows = max(1, min(rows, SAMPLE_ROWS, SAMPLE_CELLS // max(columns, 1)))
        return max(1, min(SAMPLE_ROWS, CHUNK_CELLS // max(columns, 1)))

    def sampling(self) -> bool:
        """Whether the sample takes more rows (it stops at a row count or a size)."""
        if self.sample is None:
            return True
        return len(self.sample) < self._sample_rows and self.sampled_bytes < SAMPLE_BYTES

    def add(self, frame: pd.DataFrame, size: int) -> None:
        """Rows (counted already) whose dtypes widen the table's; the first ones, read from
        about ``size`` bytes, join the sample."""
        for name, dtype in frame.dtypes.items():
            key = str(name)
            self.dtypes[key] = _widen(self.dtypes.get(key), dtype)
        if not self.sampling():
            return
        if self.sample is None:
            self.sample = frame.iloc[: self._sample_rows].copy()
        else:
            more = frame.iloc[: self._sample_rows - len(self.sample)]
            self.sample = pd.concat([self.sample, more], ignore_index=True)
        self.sampled_bytes += size
        if self.stop_at is not None and not self.sampling():
            raise _Enough

    def check_bytes(self, size: int) -> None:
        if size > self.limits.decompressed_bytes:
            raise too_many_bytes(self.filename, self.limits.decompressed_bytes)

    # -- formats --------------------------------------------------------------------------
    def parquet(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as probe:
            meta, schema = probe.metadata, probe.schema_arrow
        self.count(meta.num_rows, meta.num_columns)  # what the footer claims, first
        claimed = 0
        per_row = 1  # bytes of the widest row group's average row
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            size = 0
            for c in range(group.num_columns):
                col = group.column(c)
                width = _WIDTH.get(col.physical_type, 0)
                size += max(col.total_uncompressed_size, group.num_rows * width)
            claimed += size
            per_row = max(per_row, size // max(group.num_rows, 1))
        self.check_bytes(claimed)
        self.rows = 0  # then what the pages hold, a bounded batch at a time
        # Text and binary columns are read as dictionaries: a value repeated a million
        # times (one dictionary entry, a run of zeros) is counted at its expanded size
        # before anything expands it, and only the sample is expanded.
        variable = [f.name for f in schema if _is_binary(f.type)]
        expanded = 0
        batch_rows = max(1, min(self.chunk_rows(meta.num_columns), CHUNK_BYTES // per_row))
        with pq.ParquetFile(path, read_dictionary=variable) as pf:
            for batch in pf.iter_batches(batch_size=batch_rows):
                sizes = _row_sizes(batch)
                expanded += int(sizes.sum())
                self.check_bytes(expanded)
                self.count(batch.num_rows, batch.num_columns)
                if self.sampling():
                    budget = max(0, SAMPLE_BYTES - self.sampled_bytes)
                    keep = max(1, int((sizes.cumsum() <= budget).sum()))
                    head = _decoded(batch.slice(0, keep), schema)
                    self.add(head.to_pandas(), int(sizes[:keep].sum()))
                    continue
                for name, column in zip(batch.schema.names, batch.columns, strict=True):
                    if column.null_count and pa.types.is_integer(column.type):
                        # integers with nulls read as float64, as pandas reads the file
                        self.dtypes[name] = _widen(self.dtypes.get(name), "float64")

    def csv(self, opener: Callable[[], io.BufferedIOBase], sep: str) -> None:
        """Parse in chunks of rows; a chunk that reads more than :data:`CHUNK_BYTES` (rows
        far wider than the first ones) starts the file over with smaller chunks."""
        rows: int | None = None
        while True:
            try:
                with opener() as raw:
                    stream = Metered(raw, self.filename, self.limits.decompressed_bytes)
                    self._csv(io.BufferedReader(stream, READ_SIZE), stream, sep, rows)
                    stream.finish()
                return
            except OverBudget as over:
                if over.rows <= 1:
                    raise TooLargeError(
                        f"{self.filename} has a row over {CHUNK_BYTES >> 20} MiB",
                        field="file",
                    ) from None
                rows = max(1, over.rows // 32)
                self.reset()

    def _csv(self, fh: io.BufferedReader[Any], stream: Metered, sep: str, rows: int | None) -> None:
        # the width sets the chunk size; quoted separators only make it an overestimate
        width = first_row(fh.peek(READ_SIZE)).count(sep.encode()) + 1
        rows = min(rows or SAMPLE_ROWS, self.chunk_rows(width))
        stream.budget = (rows, CHUNK_BYTES)
        with pd.read_csv(fh, sep=sep, chunksize=rows) as reader:
            while True:
                start = stream.seen
                stream.chunk_start = start
                try:
                    chunk = reader.get_chunk()
                except StopIteration:
                    break
                self.count(len(chunk), len(chunk.columns))
                self.add(chunk, stream.seen - start)

    def jsonl(self, lines: Iterator[bytes]) -> None:
        batch: list[bytes] = []
        size = 0
        for line in lines:
            batch.append(line)
            size += len(line)
            # JSON records carry their keys, so a chunk is bounded by bytes as well
            if len(batch) >= SAMPLE_ROWS or size >= _JSON_CHUNK_BYTES:
                self._json_chunk(batch, size)
                batch, size = [], 0
        if batch:
            self._json_chunk(batch, size)

    def _json_chunk(self, lines: list[bytes], size: int) -> None:
        frame = _json_frame(lines)
        self.count(len(frame), len(frame.columns))
        self.add(frame, size)


def _is_binary(dtype: Any) -> bool:
    import pyarrow as pa

    return bool(
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_binary(dtype)
        or pa.types.is_large_binary(dtype)
    )


def _row_sizes(batch: Any) -> Any:
    """Each row's bytes once every dictionary is expanded (a numpy int64 array)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    total = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        kind = column.type
        if pa.types.is_dictionary(kind):
            if _is_binary(kind.value_type) and len(column.dictionary):
                lengths = pc.binary_length(column.dictionary).fill_null(0)
                indices = column.indices.fill_null(0).to_numpy(zero_copy_only=False)
                total += lengths.to_numpy(zero_copy_only=False).astype(np.int64)[indices]
            else:
                total += _width(kind.value_type) or 8
        elif _is_binary(kind):
            total += pc.binary_length(column).fill_null(0).to_numpy(zero_copy_only=False)
        else:
            total += _width(kind) or column.nbytes // max(batch.num_rows, 1) + 1  # nested
    return total


def _width(kind: Any) -> int:
    """Bytes per value of a fixed-width arrow type (a bool counts a byte); 0 for others."""
    try:
        return max(1, int(kind.bit_width) // 8)
    except ValueError:
        return 0


def _decoded(batch: Any, schema: Any) -> Any:
    """``batch`` with the columns read as dictionaries expanded back to the file's type."""
    import pyarrow as pa

    columns = []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        wanted = schema.field(name).type if name in schema.names else column.type
        if pa.types.is_dictionary(column.type) and not pa.types.is_dictionary(wanted):
            column = column.dictionary_decode()
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _json_frame(lines: list[bytes]) -> pd.DataFrame:
    frame = pd.read_json(io.BytesIO(b"".join(lines)), lines=True)
    if not isinstance(frame, pd.DataFrame):
        raise ValueError("each JSON line must be an object")
    return frame


def _widen(seen: str | None, dtype: Any) -> str:
    """The dtype a whole-table read gives a column that had ``seen`` and now ``dtype``."""
    now = str(dtype)
    if seen is None or seen == now:
        return now
    numbers = ("int", "uint", "float")
    if seen.startswith(numbers) and now.startswith(numbers):
        return "float64"
    if seen.startswith((*numbers, "bool")) and now.startswith((*numbers, "bool")):
        return "object"
    return now if not now.startswith((*numbers, "bool")) else seen  # text wins over numbers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
