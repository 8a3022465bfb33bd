"""Reading tables (csv/parquet/jsonl/sklearn) and inferring column kinds."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from kiln.data.schema import infer_kind, select_features
from kiln.data.sources import fingerprint, load_sklearn, read_table, table_format
from kiln.errors import DataError, NotFoundError, SpecError


@pytest.mark.parametrize("name", ["t.csv", "t.parquet", "t.jsonl"])
def test_read_table_round_trips_each_format(frame, write_table, name):
    got = read_table(write_table(frame, name))
    assert list(got.columns) == list(frame.columns)
    assert len(got) == len(frame)
    np.testing.assert_allclose(got["x1"].to_numpy(), frame["x1"].to_numpy())
    assert got["color"].astype(str).tolist() == frame["color"].tolist()


def test_read_tsv_and_gzip_csv(tmp_path, frame):
    tsv = tmp_path / "t.tsv"
    frame.to_csv(tsv, sep="\t", index=False)
    assert read_table(str(tsv)).shape == frame.shape
    gz = tmp_path / "t.csv.gz"
    with gzip.open(gz, "wt") as fh:
        frame.to_csv(fh, index=False)
    assert read_table(str(gz)).shape == frame.shape


RECORDS = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]


def test_json_array_of_records_is_read(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    got = read_table(str(path))
    assert got["a"].tolist() == [1, 2]
    assert got["b"].tolist() == ["x", "y"]


def test_compact_json_array_of_records_is_read(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(RECORDS))
    got = read_table(str(path))
    assert list(got.columns) == ["a", "b"]
    assert got["a"].tolist() == [1, 2]


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFoundError) as info:
        read_table(str(tmp_path / "absent.csv"))
    assert "absent.csv" in info.value.message
    assert info.value.field == "data.source"


@pytest.mark.parametrize("name", ["data.txt", "data.xlsx", "data"])
def test_unknown_suffix_is_a_data_error(name):
    with pytest.raises(DataError) as info:
        table_format(name)
    assert name in info.value.message
    with pytest.raises(DataError):
        read_table(name)


def test_directory_header_only_and_garbage(tmp_path):
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    with pytest.raises(DataError, match="is a directory"):
        read_table(str(folder))
    empty = tmp_path / "empty.csv"
    empty.write_text("a,b\n")
    with pytest.raises(DataError, match="has no rows"):
        read_table(str(empty))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match="as parquet"):
        read_table(str(bad))


@pytest.mark.parametrize(
    ("name", "rows", "labels"),
    [
        ("iris", 150, {"setosa", "versicolor", "virginica"}),
        ("wine", 178, {"class_0", "class_1", "class_2"}),
        ("digits", 1797, set(range(10))),
    ],
)
def test_sklearn_loader(name, rows, labels):
    df = read_table(f"sklearn:{name}")
    assert len(df) == rows
    assert "target" in df.columns
    assert set(df["target"]) == labels


def test_sklearn_regression_set_keeps_numeric_target():
    df = load_sklearn("diabetes")
    assert pd.api.types.is_float_dtype(df["target"])


def test_unknown_sklearn_dataset():
    with pytest.raises(DataError, match="unknown sklearn dataset 'mnist'"):
        read_table("sklearn:mnist")


def test_fingerprint_tracks_content(frame):
    assert fingerprint(frame) == fingerprint(frame.copy())
    changed = frame.copy()
    changed.loc[0, "x1"] += 1.0
    assert fingerprint(changed) != fingerprint(frame)
    assert fingerprint(frame).startswith("sha256:")


# ---- column kinds ------------------------------------------------------------------


def test_infer_kind():
    assert infer_kind(pd.Series([1, 2, 3])) == "numeric"
    assert infer_kind(pd.Series([1.5, np.nan])) == "numeric"
    assert infer_kind(pd.Series([True, False])) == "numeric"
    assert infer_kind(pd.Series(["a", "b", None, "a"])) == "categorical"
    assert infer_kind(pd.Series([None, None], dtype=object)) == "categorical"
    text = pd.Series(
        [
            "the quick brown fox jumps",
            "a lazy dog sleeps all day",
            "hello there my good friend",
            "one two three four five",
        ]
    )
    assert infer_kind(text) == "text"
    # Long but repeated values are categories, not free text.
    assert infer_kind(pd.Series(["very long repeated category value"] * 10)) == "categorical"


def test_select_features_default_skips_target_and_text(frame):
    df = frame.assign(note=[f"free text number {i} here today" for i in range(len(frame))])
    cols = select_features(df, "label", None)
    assert [(c.name, c.kind) for c in cols] == [
        ("x1", "numeric"),
        ("x2", "numeric"),
        ("color", "categorical"),
    ]
    with pytest.raises(SpecError) as info:
        select_features(df, "label", ["x1", "note"])
    assert "note" in info.value.message


def test_select_features_errors(frame):
    with pytest.raises(DataError) as info:
        select_features(frame, "nope", None)
    assert info.value.field == "data.target"
    with pytest.raises(DataError) as info:
        select_features(frame, "label", ["x1", "missing_col"])
    assert "missing_col" in info.value.message
    assert [c.name for c in select_features(frame, "label", ["x2"])] == ["x2"]


def test_fsspec_uris_are_read(frame):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/kiln-tests/t.csv", frame.to_csv(index=False).encode())
    try:
        got = read_table("memory://kiln-tests/t.csv")
        assert got.shape == frame.shape
        with pytest.raises(NotFoundError):
            read_table("memory://kiln-tests/absent.csv")
    finally:
        fs.rm("/kiln-tests", recursive=True)
