"""Data-parallel training on a real local Ray cluster (2 workers of 1 CPU): the same
weights as training in one process with the same global batch, for a tabular MLP and
a generative GPT; a run asking for more than the cluster has fails saying so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from support import gpt_spec, write_chats

pytestmark = pytest.mark.distributed


def _table(path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    frame["y"] = np.where(x[:, 0] + x[:, 1] > 0, "yes", "no")
    frame.to_csv(path, index=False)
    return path


def _executor(address: str, timeout: float = 60.0) -> Any:
    from kiln.jobs.executors.ray import RayExecutor

    records: list[Any] = []
    executor = RayExecutor(address, timeout=timeout, on_record=records.append)
    executor.records = records  # type: ignore[attr-defined]
    return executor


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def test_an_mlp_on_two_ray_workers_equals_one_process(ray_address: str, tmp_path: Path) -> None:
    import kiln

    spec: dict[str, Any] = {
        "name": "two",
        "task": "classification",
        "data": {"source": str(_table(tmp_path / "t.csv")), "target": "y"},
        "model": {"type": "mlp", "hidden": [16, 8]},
        "train": {
            "epochs": 3,
            "batch_size": 24,  # 210 training rows: a short last step, odd halves
            "gradient_accumulation": 2,
            "grad_clip": 1.0,
            "regularization": {"l2": 1e-3},
            "optimizer": {"name": "adam", "lr": 0.01},
            "device": "cpu",
        },
    }
    alone = kiln.fit(spec)
    spec["train"]["resources"] = {"workers": 2, "cpus_per_worker": 1}
    executor = _executor(ray_address)
    ray_bundle = kiln.fit(spec, executor=executor)

    assert _max_difference(alone.model, ray_bundle.model) < 1e-5
    for a, b in zip(alone.meta.training.history, ray_bundle.meta.training.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    record = executor.records[-1]
    assert record["kind"] == "ray" and record["address"] == ray_address
    assert sorted(w["rank"] for w in record["workers"]) == [0, 1]
    assert len({w["pid"] for w in record["workers"]}) == 2
    assert all(w["cpus"] == 1.0 and w["node_ip"] not in ("", "?") for w in record["workers"])
    assert len({w["node_id"] for w in record["workers"]}) == 1  # one head node
    assert record["worker_seconds"] > 0


def test_a_gpt_on_two_ray_workers_equals_one_process(ray_address: str, tmp_path: Path) -> None:
    import kiln

    spec = gpt_spec(write_chats(tmp_path / "chats.jsonl", n=40), epochs=2, device="cpu")
    spec["model"]["dropout"] = 0.0  # dropout masks differ between one batch and two halves
    alone = kiln.fit(spec)
    spec["train"]["resources"] = {"workers": 2}
    on_ray = kiln.fit(spec, executor=_executor(ray_address))
    assert _max_difference(alone.model, on_ray.model) < 1e-5
    assert alone.meta.metrics["test"]["loss"] == pytest.approx(
        on_ray.meta.metrics["test"]["loss"], rel=1e-5
    )


def test_asking_for_more_than_the_cluster_has_fails_saying_so(
    ray_address: str, tmp_path: Path
) -> None:
    import kiln
    from kiln.errors import ResourcesUnavailableError

    spec: dict[str, Any] = {
        "name": "big",
        "task": "classification",
        "data": {"source": str(_table(tmp_path / "t.csv")), "target": "y"},
        "model": {"type": "linear"},
        "train": {"epochs": 1, "resources": {"workers": 8, "cpus_per_worker": 2}},
    }
    with pytest.raises(ResourcesUnavailableError) as caught:
        kiln.fit(spec, executor=_executor(ray_address, timeout=2))
    message = caught.value.message
    assert "asks for 8 workers x 2 CPUs" in message, message
    assert "has 2 CPUs" in message and "within 2 s" in message, message
    assert "KILN_RAY_RESOURCE_TIMEOUT" in message


def test_a_streaming_parquet_source_trains_on_two_ray_workers(
    ray_address: str, tmp_path: Path
) -> None:
    """Each worker streams its own shard (row groups round-robin) of a hive-partitioned
    folder; DDP averages their gradients."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import kiln

    rng = np.random.default_rng(3)
    x = rng.normal(size=(4000, 3))
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    frame["shop"] = rng.choice(["s1", "s2"], len(frame))
    frame["label"] = np.where(x[:, 0] - x[:, 1] > 0, "up", "down")
    root = tmp_path / "lake"
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_to_dataset(table, root, partition_cols=["shop"], row_group_size=250)
    spec: dict[str, Any] = {
        "name": "lake",
        "task": "classification",
        "data": {"source": str(root), "target": "label", "streaming": True},
        "model": {"type": "mlp", "hidden": [16]},
        "train": {
            "epochs": 2,
            "batch_size": 64,
            "device": "cpu",
            "optimizer": {"lr": 0.01},
            "resources": {"workers": 2},
        },
    }
    executor = _executor(ray_address)
    bundle = kiln.fit(spec, executor=executor)
    assert bundle.meta.metrics["test"]["accuracy"] > 0.9
    assert [e["epoch"] for e in bundle.meta.training.history] == [1, 2]
    assert sorted(w["rank"] for w in executor.records[-1]["workers"]) == [0, 1]
