"""The streaming pass fits what Preprocessor.fit fits; the hash split; the batch stream."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.data.parquet import discover
from kiln.data.preprocess import Preprocessor
from kiln.data.preprocess_fit import class_labels
from kiln.data.schema import select_features
from kiln.data.stream import HashSplit, ParquetBatches, StreamTable
from kiln.data.stream_fit import fit_stream
from kiln.errors import SpecError
from kiln.spec.data import Preprocessing


def _frame(n: int = 3000) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "a": rng.normal(5.0, 2.0, n),
            "b": rng.integers(0, 100, n).astype(np.int64),
            "c": rng.choice(["x", "y", "z", "w"], n, p=[0.4, 0.3, 0.2, 0.1]),
            "flag": rng.random(n) < 0.3,
            "y": rng.choice(["no", "yes", "maybe"], n),
            "r": rng.normal(10.0, 3.0, n),
        }
    )
    frame.loc[rng.random(n) < 0.1, "a"] = np.nan
    frame["c"] = frame["c"].astype(object)
    frame.loc[rng.random(n) < 0.1, "c"] = None
    frame["y"] = frame["y"].astype(object)
    frame.loc[rng.random(n) < 0.05, "y"] = None  # rows without a target are dropped
    frame.loc[rng.random(n) < 0.05, "r"] = np.nan
    return frame


def _write(frame: pd.DataFrame, root, files: int = 3, row_group: int = 250) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(frame)), files)):
        table = pa.Table.from_pandas(frame.iloc[part], preserve_index=False)
        pq.write_table(table, root / f"part-{i}.parquet", row_group_size=row_group)
    return str(root)


OPTIONS = [
    Preprocessing(),  # mean fill, standard scale, onehot
    Preprocessing(missing="constant", fill_value=-1, scale="minmax", categorical="ordinal"),
    Preprocessing(missing="native", scale="none", categorical="native"),
    Preprocessing(missing="drop", scale="standard"),
    Preprocessing(missing="median", scale="minmax"),  # categorical median = mode
]


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"{o.missing}-{o.scale}")
def test_streaming_fit_equals_the_in_memory_fit(tmp_path, options, task):
    frame = _frame()
    target = "y" if task == "classification" else "r"
    features = ["a", "b", "c", "flag"] if options.missing != "median" else ["c"]
    source = discover(_write(frame[[*features, target]], tmp_path / "t"))
    split = HashSplit(test=0.2, val=0.1, seed=3)
    table = StreamTable.open(source, features, target, split, options.missing == "drop")
    columns = select_features(frame[[*features, target]], target, features)
    fitted = fit_stream(table, columns, task, options)

    # the in-memory path: drop rows as load_table does, split by the same hash
    keep = frame[target].notna()
    if options.missing == "drop":
        keep &= frame[features].notna().all(axis=1)
    parts = split.frame_codes(frame, 0)
    kept = frame[keep.to_numpy()]
    train = frame[keep.to_numpy() & (parts == 0)]
    labels = class_labels(kept[target]) if task == "classification" else None
    expected = Preprocessor.fit(train, columns, target, task, options, labels=labels).state

    got = fitted.preprocessor.state
    assert got.model_dump(exclude={"features", "target"}) == expected.model_dump(
        exclude={"features", "target"}
    )
    for g, e in zip(got.features, expected.features, strict=True):
        _same(g.model_dump(), e.model_dump())
    _same(got.target.model_dump(), expected.target.model_dump())
    assert fitted.labels == labels
    assert fitted.rows_read == len(frame)
    assert fitted.rows_dropped == int((~keep).sum())
    assert fitted.counts.train == len(train)
    assert fitted.counts.val == int((keep.to_numpy() & (parts == 1)).sum())
    assert sum(fitted.group_rows.values()) == len(train)
    val = kept[parts[keep.to_numpy()] == 1]
    assert fitted.val is not None and list(fitted.val.index) == list(val.index)  # row numbers
    assert fitted.val[target].astype(str).tolist() == val[target].astype(str).tolist()


def _same(got: dict[str, object], expected: dict[str, object]) -> None:
    """Equal, floats to rounding (a streamed mean sums in another order than numpy)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        else:
            assert got[key] == value, key


def test_median_for_numeric_columns_is_refused(tmp_path):
    frame = _frame(200)
    source = discover(_write(frame[["a", "y"]], tmp_path / "t", files=1))
    table = StreamTable.open(source, ["a"], "y", HashSplit(0.2, 0.1, 0))
    columns = select_features(frame[["a", "y"]], "y", ["a"])
    with pytest.raises(SpecError) as err:
        fit_stream(table, columns, "classification", Preprocessing(missing="median"))
    assert err.value.field == "data.preprocessing.missing"


# ---- the hash split ---------------------------------------------------------------------

_CODES = (
    "import numpy as np, sys; from kiln.data.stream import HashSplit;"
    "k = np.array(['id%d' % i for i in range(2000)], dtype=object);"
    "sys.stdout.write(HashSplit(0.2, 0.1, 7, key='k').codes(k).tobytes().hex())"
)


def test_hash_split_is_stable_across_processes_and_close_to_the_fractions():
    keys = np.array([f"id{i}" for i in range(2000)], dtype=object)
    here = HashSplit(0.2, 0.1, 7, key="k").codes(keys)
    there = subprocess.run(
        [sys.executable, "-c", _CODES], capture_output=True, text=True, check=True
    ).stdout
    assert here.tobytes().hex() == there
    rows = HashSplit(0.2, 0.1, 7).codes(np.arange(100_000))
    shares = np.bincount(rows, minlength=3) / len(rows)
    assert shares == pytest.approx([0.7, 0.1, 0.2], abs=0.01)
    # another seed is another split
    assert (HashSplit(0.2, 0.1, 8).codes(np.arange(100_000)) != rows).mean() > 0.3


def test_a_key_column_follows_its_rows_and_row_numbers_follow_positions():
    frame = pd.DataFrame({"id": np.arange(5000) * 7 + 3})
    split = HashSplit(0.3, 0.1, 0, key="id")
    by_key = dict(zip(frame["id"], split.frame_codes(frame, 0), strict=True))
    shuffled = frame.sample(frac=1.0, random_state=1)
    again = dict(zip(shuffled["id"], split.frame_codes(shuffled, 0), strict=True))
    assert by_key == again  # membership goes with the key, not the position
    rows = HashSplit(0.3, 0.1, 0)
    head = rows.frame_codes(frame.iloc[:100], 0)
    assert np.array_equal(rows.frame_codes(frame, 0)[:100], head)
    assert not np.array_equal(rows.frame_codes(frame.iloc[:100], 100), head)


# ---- the batch stream ---------------------------------------------------------------------


def _id_stream(tmp_path, n: int = 4000) -> tuple[ParquetBatches, set[int]]:
    """A stream whose one feature is the row id (unscaled), so batches name their rows."""
    frame = pd.DataFrame({"id": np.arange(n, dtype=np.float64), "y": np.arange(n) % 2})
    source = discover(_write(frame, tmp_path / "ids", files=4, row_group=300))
    table = StreamTable.open(source, ["id"], "y", HashSplit(0.2, 0.1, 0))
    columns = select_features(frame, "y", ["id"])
    fitted = fit_stream(table, columns, "classification", Preprocessing(scale="none"))
    train = set(np.flatnonzero(HashSplit(0.2, 0.1, 0).codes(np.arange(n)) == 0).tolist())
    return ParquetBatches(table, fitted.preprocessor, fitted.group_rows), train


def _ids(stream: ParquetBatches, epoch: int, batch: int = 64) -> list[int]:
    out: list[int] = []
    for x, y in stream.batches(epoch, seed=0, batch=batch):
        assert x.dtype.is_floating_point and len(x) == len(y) <= batch
        assert np.array_equal(y.numpy(), x[:, 0].numpy().astype(int) % 2)  # rows stay whole
        out.extend(x[:, 0].numpy().astype(int).tolist())
    return out


def test_every_training_row_once_per_epoch_shuffled_per_epoch(tmp_path):
    stream, train = _id_stream(tmp_path)
    first, second = _ids(stream, 0), _ids(stream, 1)
    assert sorted(first) == sorted(train) == sorted(second)
    assert stream.rows == len(train)
    assert first != second
    assert first == _ids(stream, 0)  # deterministic from (seed, epoch)
    # shuffled beyond file order: far from sorted
    assert abs(np.corrcoef(np.arange(len(first)), first)[0, 1]) < 0.9


def test_shards_are_disjoint_and_cover_the_training_rows(tmp_path):
    stream, train = _id_stream(tmp_path)
    a, b = _ids(stream.shard(0, 2), 0), _ids(stream.shard(1, 2), 0)
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(train)
    assert stream.shard(0, 2).rows == stream.rows  # all shards, per the BatchStream contract
    assert stream.shard(0, 2).shard_rows == len(a)
