"""Parquet datasets as sources: directories (hive-partitioned), globs, one file, read whole."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.data.parquet import discover, is_dataset_source
from kiln.data.sources import read_table
from kiln.errors import DataError, NotFoundError
from kiln.spec.data import DataSpec


def _frame(n: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "x": rng.normal(size=n),
            "k": np.arange(n),
            "color": rng.choice(["red", "blue"], n),
            "region": rng.choice(["eu", "us", "ap"], n),
        }
    )


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("k").reset_index(drop=True)


def test_a_hive_partitioned_folder_reads_whole_with_the_partition_column(tmp_path):
    frame = _frame()
    root = tmp_path / "table"
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_to_dataset(table, root, partition_cols=["region"], row_group_size=40)
    (root / "_SUCCESS").write_text("")  # what Spark leaves beside its files
    assert is_dataset_source(str(root))
    got = read_table(str(root))
    assert set(got.columns) == set(frame.columns)
    got = _sorted(got[list(frame.columns)])
    got["region"] = got["region"].astype(str)
    pd.testing.assert_frame_equal(got, _sorted(frame), check_dtype=False)


def test_a_glob_and_a_nested_folder(tmp_path):
    frame = _frame()
    (tmp_path / "a" / "b").mkdir(parents=True)
    frame.iloc[:100].to_parquet(tmp_path / "a" / "part-0.parquet")
    frame.iloc[100:].to_parquet(tmp_path / "a" / "b" / "part-1.parquet")
    (tmp_path / "a" / "notes.txt").write_text("not data")
    whole = read_table(str(tmp_path / "a"))  # recursive
    pd.testing.assert_frame_equal(_sorted(whole), _sorted(frame), check_dtype=False)
    one = read_table(str(tmp_path / "a" / "*.parquet"))  # only the top file
    pd.testing.assert_frame_equal(_sorted(one), _sorted(frame.iloc[:100]), check_dtype=False)


def test_discovery_orders_files_and_row_groups(tmp_path):
    frame = _frame()
    pq.write_table(pa.Table.from_pandas(frame.iloc[150:]), tmp_path / "b.parquet", 50)
    pq.write_table(pa.Table.from_pandas(frame.iloc[:150]), tmp_path / "a.parquet", 50)
    src = discover(str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in src.files] == ["a.parquet", "b.parquet"]
    assert [(g.file, g.start, g.rows) for g in src.row_groups] == [
        (0, 0, 50),
        (0, 50, 50),
        (0, 100, 50),
        (1, 150, 50),
        (1, 200, 50),
        (1, 250, 50),
    ]
    assert src.num_rows == 300
    single = discover(str(tmp_path / "a.parquet"))
    assert single.num_rows == 150


def test_fingerprint_is_stable_and_sees_a_rewrite(tmp_path):
    frame = _frame()
    frame.to_parquet(tmp_path / "a.parquet")
    first = discover(str(tmp_path)).fingerprint()
    assert first == discover(str(tmp_path)).fingerprint()
    assert first.startswith("sha256:")
    frame.assign(x=frame["x"] + 1).to_parquet(tmp_path / "a.parquet")
    assert discover(str(tmp_path)).fingerprint() != first


def test_nothing_there_and_not_parquet(tmp_path):
    with pytest.raises(NotFoundError):
        discover(str(tmp_path / "*.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError):
        discover(str(tmp_path)).fingerprint()


def test_a_folder_of_parquet_is_not_an_image_folder(tmp_path):
    (tmp_path / "tab" / "k=1").mkdir(parents=True)
    _frame().to_parquet(tmp_path / "tab" / "k=1" / "p.parquet")
    (tmp_path / "img" / "cat").mkdir(parents=True)
    (tmp_path / "img" / "cat" / "a.png").write_bytes(b"")
    assert not DataSpec(source=str(tmp_path / "tab"), target="x").is_image_folder
    assert DataSpec(source=str(tmp_path / "img")).is_image_folder
    assert not is_dataset_source(str(tmp_path / "img"))
    assert not is_dataset_source("s3://bucket/table.csv")
    assert is_dataset_source("s3://bucket/tables/")


def test_an_s3_prefix_streams_and_reads_whole(s3_bucket, monkeypatch, tmp_path):
    from kiln.data.stream import HashSplit, StreamTable
    from servers import s3_client

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint_url)
    frame = _frame()
    local = tmp_path / "t"
    pq.write_to_dataset(
        pa.Table.from_pandas(frame, preserve_index=False), local, partition_cols=["region"]
    )
    client = s3_client(s3_bucket.endpoint_url)
    for path in local.rglob("*.parquet"):
        key = f"tables/t/{path.relative_to(local).as_posix()}"
        client.put_object(Bucket=s3_bucket.name, Key=key, Body=path.read_bytes())
    source = f"s3://{s3_bucket.name}/tables/t"
    whole = read_table(source)
    got = _sorted(whole[list(frame.columns)]).astype({"region": str})
    pd.testing.assert_frame_equal(got, _sorted(frame), check_dtype=False)
    src = discover(source)
    assert src.fingerprint() == discover(source).fingerprint()
    table = StreamTable.open(src, ["x", "region"], "color", HashSplit(0.2, 0.1, 0))
    assert sum(len(c.frame) for c in table.chunks()) == len(frame)


def test_a_file_whose_name_looks_like_a_glob_is_that_file(tmp_path):
    from kiln.data.sources import read_table

    folder = tmp_path / "run[1]"
    folder.mkdir()
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_csv(folder / "t?.csv", index=False)
    frame = read_table(str(folder / "t?.csv"))
    assert frame["a"].tolist() == [1, 2]


def test_split_keys_hash_alike_whatever_batch_they_are_read_in():
    """pandas reads an int64 key as float64 in a batch that holds a null."""
    from kiln.data.stream import HashSplit

    split = HashSplit(test=0.3, val=0.2, seed=4, key="id")
    ints = pd.DataFrame({"id": pd.Series(range(1000, 1200), dtype="int64")})
    floats = pd.DataFrame({"id": pd.Series([*range(1000, 1200), None], dtype="float64")})
    assert (split.frame_codes(ints, 0) == split.frame_codes(floats, 0)[:200]).all()
