"""``data.streaming``: kiln.fit trains from a Parquet dataset read in batches."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import kiln
from kiln.data.parquet import discover
from kiln.errors import SpecError


def _separable(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    frame["shop"] = rng.choice(["s1", "s2", "s3"], n)
    frame["id"] = np.arange(n) * 11 + 5
    frame["label"] = np.where(x[:, 0] - x[:, 1] + 0.5 * x[:, 2] > 0, "up", "down")
    frame["value"] = 3.0 * x[:, 0] - 2.0 * x[:, 1] + 10.0
    return frame


def _partitioned(frame: pd.DataFrame, root) -> str:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_to_dataset(table, root, partition_cols=["shop"], row_group_size=500)
    return str(root)


def _spec(source: str, **data) -> dict[str, object]:
    return {
        "name": "streamed",
        "task": "classification",
        "data": {"source": source, "target": "label", "streaming": True, **data},
        "model": {"type": "linear"},
        "train": {"epochs": 3, "batch_size": 128, "device": "cpu", "optimizer": {"lr": 0.05}},
    }


def test_streaming_fit_trains_and_saves_a_bundle_that_predicts(tmp_path):
    frame = _separable(6000)
    source = _partitioned(frame.drop(columns=["value"]), tmp_path / "data")
    features = ["a", "b", "c", "shop"]  # the id decides the split, it is no feature
    spec = _spec(source, features=features, split={"key": "id", "test": 0.2, "val": 0.1})
    bundle = kiln.fit(spec, out=tmp_path / "model")
    assert bundle.metrics["test"]["accuracy"] > 0.95
    assert bundle.metrics["val"]["accuracy"] > 0.95
    lineage = bundle.meta.lineage
    assert lineage.data.fingerprint == discover(source).fingerprint()
    assert lineage.data.rows_read == 6000
    split = lineage.split
    assert split.train + split.val + split.test == 6000
    assert split.test == pytest.approx(1200, abs=120)
    # the hive partition column is a feature
    assert [c.name for c in bundle.meta.input_schema] == features
    loaded = kiln.Bundle.load(tmp_path / "model")
    rows = frame.sample(200, random_state=0)
    predicted = loaded.predict(rows.drop(columns=["label", "value"])).predictions
    assert np.mean(np.array(predicted) == rows["label"].to_numpy()) > 0.95
    assert set(loaded.meta.reference["columns"]) == {"a", "b", "c", "shop"}


def test_streaming_regression_and_a_glob(tmp_path):
    frame = _separable(4000, seed=2)
    (tmp_path / "d").mkdir()
    table = frame.drop(columns=["label", "id"])
    for i in range(4):
        table.iloc[i * 1000 : (i + 1) * 1000].to_parquet(
            tmp_path / "d" / f"part-{i}.parquet", row_group_size=300
        )
    spec = _spec(str(tmp_path / "d" / "part-*.parquet"), target="value")
    spec["task"] = "regression"
    spec["train"] = {"epochs": 8, "batch_size": 64, "device": "cpu", "optimizer": {"lr": 0.02}}
    bundle = kiln.fit(spec)
    assert bundle.metrics["test"]["r2"] > 0.98


@pytest.mark.parametrize("model", [{"type": "gbdt"}, {"type": "auto"}])
def test_models_that_cannot_stream_are_refused(tmp_path, model):
    source = _partitioned(_separable(300).drop(columns=["value"]), tmp_path / "data")
    spec = {**_spec(source), "model": model, "train": {}}
    with pytest.raises(SpecError) as err:
        kiln.fit(spec)
    assert err.value.field == "data.streaming"


def test_a_full_batch_is_refused(tmp_path):
    source = _partitioned(_separable(300).drop(columns=["value"]), tmp_path / "data")
    spec = _spec(source)
    spec["train"] = {"epochs": 1, "batch_size": "full"}
    with pytest.raises(SpecError) as err:
        kiln.fit(spec)
    assert err.value.field == "train.batch_size"


# ---- memory: a table larger than the process is allowed to grow --------------------------

_PEAK = textwrap.dedent(
    """
    import json, sys, time
    import kiln
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    started = time.perf_counter()
    bundle = kiln.fit(json.loads(sys.argv[1]))
    print(json.dumps({"peak": hwm(), "seconds": time.perf_counter() - started,
                      "accuracy": bundle.metrics["test"]["accuracy"]}))
    """
)

_FEATURES = 24
_ROWS = 2_200_000  # x (24 + 1) float64 columns = 420 MiB in memory


def _peak(spec: dict[str, object]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, json.dumps(spec)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _write_table(root, rows: int, per_file: int) -> None:
    """Random features, a linearly separable label; written file by file (this process
    never holds the table)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    weights = rng.normal(size=_FEATURES)
    for i in range(rows // per_file):
        x = rng.normal(size=(per_file, _FEATURES))
        columns = {f"f{j}": x[:, j] for j in range(_FEATURES)}
        columns["y"] = (x @ weights > 0).astype(np.float64)
        pq.write_table(pa.table(columns), root / f"part-{i:03d}.parquet", row_group_size=50_000)


def _big_spec(source: str) -> dict[str, object]:
    return {
        "name": "big",
        "task": "classification",
        "data": {
            "source": source,
            "target": "y",
            "streaming": True,
            "split": {"test": 0.02, "val": 0.01},
        },
        "model": {"type": "linear"},
        "train": {"epochs": 1, "batch_size": 4096, "device": "cpu", "optimizer": {"lr": 0.05}},
    }


@pytest.mark.slow
def test_training_on_a_table_larger_than_the_memory_it_uses(tmp_path):
    """The same streaming fit on 420 MiB (as float64 in memory) and on 1/40 of it: the
    peak RSS grows by far less than the table (the libraries' own memory is in both)."""
    _write_table(tmp_path / "big", _ROWS, per_file=275_000)
    _write_table(tmp_path / "small", _ROWS // 40, per_file=_ROWS // 40)
    in_memory = _ROWS * (_FEATURES + 1) * 8
    small = _peak(_big_spec(str(tmp_path / "small")))
    big = _peak(_big_spec(str(tmp_path / "big")))
    grown = big["peak"] - small["peak"]
    print(
        f"in memory {in_memory / 2**20:.0f} MiB; peak RSS {big['peak'] / 2**20:.0f} MiB, "
        f"{grown / 2**20:.0f} MiB above the small table's; {big['seconds']:.1f} s"
    )
    assert big["accuracy"] > 0.9
    assert grown < 150 * 2**20 < in_memory / 2


def test_without_streaming_a_partitioned_folder_is_read_whole(tmp_path):
    frame = _separable(1500).drop(columns=["value", "id"])
    source = _partitioned(frame, tmp_path / "data")
    spec = _spec(source)
    spec["data"] = {"source": source, "target": "label"}
    bundle = kiln.fit(spec)
    assert bundle.meta.lineage.data.rows_read == 1500
    assert "shop" in [c.name for c in bundle.meta.input_schema]
    assert bundle.metrics["test"]["accuracy"] > 0.9


def test_a_split_key_needs_streaming():
    spec = _spec("sklearn:iris", target="target", split={"key": "id"})
    spec["data"]["streaming"] = False
    with pytest.raises(SpecError) as err:
        kiln.load_spec(spec)
    assert err.value.field == "data.split.key"
