"""Scanning an untrusted table: exact counts, limits named, bounded sample, same parser."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.data import scan as scan_module
from kiln.data import streams as streams_module
from kiln.data.scan import SAMPLE_ROWS, Limits, read_head, scan_table
from kiln.errors import DataError, TooLargeError
from kiln.settings import Settings

ROWS = b"x1,x2,label\n1.0,2.0,a\n3.0,4.0,b\n"


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _scan(tmp_path: Path, name: str, data: bytes, **limits: int):
    return scan_table(_write(tmp_path, name, data), name, Limits(**limits))


def test_the_default_limits_are_the_settings_defaults(monkeypatch) -> None:
    for var in ("KILN_MAX_DATASET_ROWS", "KILN_MAX_DATASET_CELLS", "KILN_MAX_DECOMPRESSED_MB"):
        monkeypatch.delenv(var, raising=False)
    assert Limits.of(Settings()) == Limits()
    monkeypatch.setenv("KILN_MAX_DATASET_ROWS", "5")
    monkeypatch.setenv("KILN_MAX_DECOMPRESSED_MB", "1.5")
    assert Limits.of(Settings()) == Limits(rows=5, decompressed_bytes=3 << 19)


@pytest.mark.parametrize(
    ("name", "pack"),
    [
        ("t.csv", lambda b: b),
        ("t.csv.gz", gzip.compress),
        ("t.csv.bz2", bz2.compress),
        ("t.csv.xz", lzma.compress),
        ("t.tsv", lambda b: b.replace(b",", b"\t")),
    ],
)
def test_text_tables_plain_and_compressed(tmp_path, name, pack) -> None:
    out = _scan(tmp_path, name, pack(ROWS))
    assert out.rows == 2
    assert [(c.name, c.kind, c.dtype) for c in out.columns] == [
        ("x1", "numeric", "float64"),
        ("x2", "numeric", "float64"),
        ("label", "categorical", str(pd.Series(["a"]).dtype)),
    ]


def test_row_count_is_exact_past_the_sample(tmp_path) -> None:
    rows = 3 * SAMPLE_ROWS + 7
    out = _scan(tmp_path, "n.csv", b"a,b\n" + b"1,x\n" * rows)
    assert out.rows == rows
    assert len(out.sample) == SAMPLE_ROWS  # the kinds come from a bounded sample


def test_dtype_covers_the_whole_table(tmp_path) -> None:
    """Ints in the sample, a float after it: the column reads as float64 (as training)."""
    data = b"a,b\n" + b"1,x\n" * (2 * SAMPLE_ROWS) + b"1.5,y\n"
    out = _scan(tmp_path, "w.csv", data)
    whole = pd.read_csv(io.BytesIO(data))
    assert [c.dtype for c in out.columns] == [str(t) for t in whole.dtypes]


@pytest.mark.parametrize(
    ("limits", "data", "variable"),
    [
        ({"rows": 100}, b"a\n" + b"1\n" * 101, "KILN_MAX_DATASET_ROWS"),
        ({"cells": 300}, b"a,b,c\n" + b"1,2,3\n" * 101, "KILN_MAX_DATASET_CELLS"),
        ({"decompressed_bytes": 1 << 20}, b"a\n" + b"1\n" * (1 << 20), "KILN_MAX_DECOMPRESSED_MB"),
    ],
)
def test_limits_are_413s_naming_their_variable(tmp_path, limits, data, variable) -> None:
    assert _scan(tmp_path, "ok.csv.gz", gzip.compress(data[:200])).rows > 0
    with pytest.raises(TooLargeError) as err:
        _scan(tmp_path, "big.csv.gz", gzip.compress(data), **limits)
    assert variable in err.value.message and err.value.field == "file"
    assert err.value.http_status == 413


def test_a_line_over_the_cap_is_refused_without_reading_it_whole(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(streams_module, "MAX_LINE_BYTES", 4096)
    assert _scan(tmp_path, "ok.csv", b"a\n" + b"1" * 4000 + b"\n").rows == 1
    with pytest.raises(TooLargeError, match="line longer than"):
        _scan(tmp_path, "long.csv", b"a\n" + b"1" * 5000 + b"\n")
    with pytest.raises(TooLargeError, match="line longer than"):
        _scan(tmp_path, "long.jsonl", b'{"a": "' + b"x" * 5000 + b'"}\n')


def test_parquet_footer_is_checked_before_any_page(tmp_path) -> None:
    table = pa.table({"x": pa.array(np.zeros(100_000, dtype=np.int32))})
    path = tmp_path / "z.parquet"
    pq.write_table(table, path, row_group_size=10_000)
    assert scan_table(path, "z.parquet", Limits()).rows == 100_000
    with pytest.raises(TooLargeError, match="KILN_MAX_DATASET_ROWS"):
        scan_table(path, "z.parquet", Limits(rows=99_999))
    # 100k int32 values decode to 400 kB, whatever the file's few bytes of RLE say
    assert path.stat().st_size < 10_000
    with pytest.raises(TooLargeError, match="KILN_MAX_DECOMPRESSED_MB"):
        scan_table(path, "z.parquet", Limits(decompressed_bytes=300_000))


def test_parquet_types_and_sample(tmp_path) -> None:
    frame = pd.DataFrame({"n": np.arange(25_000), "s": ["a", "b"] * 12_500})
    path = tmp_path / "t.parquet"
    frame.to_parquet(path)
    out = scan_table(path, "t.parquet", Limits())
    assert out.rows == 25_000 and len(out.sample) == SAMPLE_ROWS
    assert [(c.name, c.kind) for c in out.columns] == [("n", "numeric"), ("s", "categorical")]
    assert out.columns[0].dtype == "int64"


def test_json_lines_and_arrays_are_streamed(tmp_path, monkeypatch) -> None:
    records = [{"a": i, "b": f"v{i % 3}"} for i in range(25_000)]
    lines = b"".join(json.dumps(r).encode() + b"\n\n" for r in records)  # blank lines skipped
    assert _scan(tmp_path, "t.jsonl", lines).rows == 25_000
    # a minified array is one long line: its records are bounded, not the line
    monkeypatch.setattr(streams_module, "MAX_LINE_BYTES", 4096)
    array = json.dumps(records).encode()
    out = _scan(tmp_path, "t.json", array)
    assert out.rows == 25_000
    assert [(c.name, c.kind) for c in out.columns] == [("a", "numeric"), ("b", "categorical")]
    big = json.dumps([{"a": "x" * 5000}]).encode()
    with pytest.raises(TooLargeError, match="JSON record longer than"):
        _scan(tmp_path, "big.json", big)


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("latin1.csv.gz", gzip.compress("a\nJosé\n".encode("latin-1")), "not UTF-8 text (byte 5)"),
        ("cut.csv.gz", gzip.compress(ROWS)[:-12], "cannot read cut.csv.gz as csv"),
        ("plain.csv.gz", ROWS, "cannot read plain.csv.gz as csv"),
        ("t.parquet.gz", gzip.compress(b"PAR1"), "compressed Parquet"),
        ("t.csv.zst", ROWS, "zstd"),
        ("bad.json", b"[{}, {", "cannot read bad.json as jsonl"),
    ],
)
def test_unreadable_content_is_a_data_error_naming_the_file(tmp_path, name, data, reason) -> None:
    with pytest.raises(DataError) as err:
        _scan(tmp_path, name, data)
    assert reason in err.value.message
    assert str(tmp_path) not in err.value.message and err.value.field == "file"


def test_read_head_stops_after_its_rows(tmp_path) -> None:
    # 4 GiB once inflated; read_head reads its first rows and stops
    block = gzip.compress(b"1,2\n" * (1 << 18))
    path = _write(tmp_path, "huge.csv.gz", gzip.compress(b"a,b\n") + block * 4096)
    head = read_head(path, "huge.csv.gz", rows=500)
    assert list(head.columns) == ["a", "b"] and len(head) == 500


def test_dictionary_strings_count_at_their_expanded_size(tmp_path) -> None:
    value = pa.array(["x" * 10_000])
    strings = pa.DictionaryArray.from_arrays(pa.array(np.zeros(100, dtype=np.int32)), value)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"s": strings}), path, store_schema=False)
    assert path.stat().st_size < 20_000  # 1 MB once expanded
    with pytest.raises(TooLargeError, match="KILN_MAX_DECOMPRESSED_MB"):
        scan_table(path, "d.parquet", Limits(decompressed_bytes=900_000))
    out = scan_table(path, "d.parquet", Limits())
    assert out.rows == 100
    assert out.columns[0].dtype == str(pd.read_parquet(path)["s"].dtype)  # as training reads it


def test_wide_rows_are_parsed_in_chunks_bounded_in_bytes(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(scan_module, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(scan_module, "SAMPLE_BYTES", 64 << 10)
    # narrow rows first (large chunks), then rows of 10 kB: the scan starts over smaller
    data = b"a,b\n" + b"1,x\n" * 5000 + (b"2," + b"y" * 10_000 + b"\n") * 300
    out = _scan(tmp_path, "w.csv", data)
    assert out.rows == 5300
    assert [c.dtype for c in out.columns] == [str(t) for t in pd.read_csv(io.BytesIO(data)).dtypes]
    # one quoted row of 3 MB (short lines inside it) is over the chunk size by itself
    quoted = b"a\n" + b'"' + b"z\n" * 1_500_000 + b'"\n'
    with pytest.raises(TooLargeError, match="has a row over"):
        _scan(tmp_path, "q.csv", quoted)
