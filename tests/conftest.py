"""Shared tiny fixtures: spec factories and small tables made in the test.

Nothing here imports torch, so tests that check import costs stay meaningful.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from servers import postgres_server, postgres_url, s3_bucket, s3_server  # noqa: F401

# Tiny models train fastest on one thread; on a busy small machine torch's default
# thread pool spends far more time waiting than computing. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Any]:
    """An empty, migrated SQLite metadata database in the test's folder."""
    from kiln.store.db import Database, migrate

    url = f"sqlite:///{tmp_path / 'kiln.db'}"
    migrate(url)
    database = Database(url)
    yield database
    database.dispose()


BASE_SPEC: dict[str, Any] = {
    "name": "iris",
    "task": "classification",
    "data": {"source": "sklearn:iris", "target": "target"},
    "model": {"type": "linear"},
    "train": {
        "epochs": 3,
        "batch_size": 32,
        "optimizer": {"name": "adam", "lr": 0.05},
        "device": "cpu",  # the default suite is CPU-only, GPU present or not
    },
}


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``; a value of None deletes the key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture
def make_spec() -> Callable[..., dict[str, Any]]:
    """``make_spec(model={...}, train={...})``: the iris spec with sections deep-merged."""

    def _make(**overrides: Any) -> dict[str, Any]:
        return merge(BASE_SPEC, overrides)

    return _make


def mixed_frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Numeric, categorical and label columns; the label depends on ``x1`` and ``color``."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=n)
    x2 = rng.uniform(0, 10, size=n)
    color = rng.choice(["red", "green", "blue"], size=n)
    label = np.where(x1 + (color == "red") > 0.5, "yes", "no")
    return pd.DataFrame({"x1": x1, "x2": x2, "color": color, "label": label})


@pytest.fixture
def frame() -> pd.DataFrame:
    return mixed_frame()


@pytest.fixture
def write_table(tmp_path: Path) -> Callable[[pd.DataFrame, str], str]:
    """``write_table(df, "name.csv")`` writes csv/parquet/jsonl under tmp_path; returns the path."""

    def _write(df: pd.DataFrame, name: str) -> str:
        path = tmp_path / name
        if name.endswith(".csv"):
            df.to_csv(path, index=False)
        elif name.endswith(".parquet"):
            df.to_parquet(path, index=False)
        elif name.endswith(".jsonl"):
            df.to_json(path, orient="records", lines=True)
        else:
            raise ValueError(name)
        return str(path)

    return _write
