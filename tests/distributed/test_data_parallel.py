"""The engine's data-parallel mode (``DataParallel``) in 2 real processes over gloo on
loopback, without Ray: the workers end with the same weights and optimizer state (and
in memory, the weights one process trains), with gradient accumulation, a short last
batch, BatchNorm, and streaming shards of different lengths."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import free_port

pytestmark = pytest.mark.distributed

CASES: dict[str, dict[str, Any]] = {
    "accumulation": {"n": 43, "train": {"batch_size": 8, "gradient_accumulation": 2}},
    "batchnorm": {"n": 43, "bn": True, "train": {"batch_size": 8, "gradient_accumulation": 2}},
    "stream": {"n": 100, "stream": 30, "train": {"batch_size": 10, "gradient_accumulation": 2}},
    "stream_batchnorm": {"n": 41, "stream": 41, "bn": True, "train": {"batch_size": 8}},
}


class _Stream:
    """Rows in groups of ``group``; a shard holds the groups ``rank::world``."""

    def __init__(self, x: Any, y: Any, group: int, groups: list[int] | None = None) -> None:
        self.x, self.y, self.group = x, y, group
        self.groups = groups if groups is not None else list(range(-(-len(x) // group)))

    @property
    def rows(self) -> int:
        return len(self.x)

    def shard(self, rank: int, world: int) -> _Stream:
        return _Stream(self.x, self.y, self.group, self.groups[rank::world])

    def batches(self, epoch: int, seed: int, batch: int) -> Iterator[tuple[Any, Any]]:
        import torch

        parts = [
            torch.arange(g * self.group, min((g + 1) * self.group, len(self.x)))
            for g in self.groups
        ]
        order = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        for i in range(0, len(order), batch):
            rows = order[i : i + batch]
            yield self.x[rows], self.y[rows]


def _train(case: str, rank: int, world: int) -> dict[str, Any]:
    import torch
    from torch import nn

    from kiln.spec.train import TrainSpec
    from kiln.train.loop import TensorData, fit_model
    from kiln.train.parallel import DataParallel

    cfg = CASES[case]
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 8)]
    if cfg.get("bn"):
        layers.append(nn.BatchNorm1d(8))
    model = nn.Sequential(*layers, nn.ReLU(), nn.Linear(8, 2))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["n"], 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    data = TensorData(x, y)
    if cfg.get("stream"):
        data = TensorData(x[:0], y[:0], stream=_Stream(x, y, cfg["stream"]))
    spec = TrainSpec(epochs=2, optimizer={"name": "adam", "lr": 0.01}, device="cpu", **cfg["train"])
    parallel = DataParallel(rank, world) if world > 1 else None
    optimizers: list[Any] = []
    original = torch.optim.Adam.step

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        optimizers.append(self)
        return original(self, *args, **kwargs)

    torch.optim.Adam.step = step  # type: ignore[method-assign]  # to read its state at the end
    try:
        fit_model(model, data, spec, "classification", "cross_entropy", parallel=parallel)
    finally:
        torch.optim.Adam.step = original  # type: ignore[method-assign]
    state = {k: v.tolist() for k, v in model.state_dict().items() if v.is_floating_point()}
    moments = optimizers[-1].state_dict()["state"]
    for i, entry in moments.items():
        state[f"adam.{i}.exp_avg"] = entry["exp_avg"].tolist()
    return state


def _worker(rank: int, world: int, case: str, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        Path(f"{out}.{rank}").write_text(json.dumps(_train(case, rank, world)))
    finally:
        dist.destroy_process_group()


def _difference(a: dict[str, Any], b: dict[str, Any], keys: list[str] | None = None) -> float:
    import torch

    return max(
        float(
            (torch.tensor(a[k], dtype=torch.float64) - torch.tensor(b[k], dtype=torch.float64))
            .abs()
            .max()
        )
        for k in (keys or list(a))
    )


@pytest.mark.parametrize("case", list(CASES))
def test_two_workers_stay_equal(case: str, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    out = str(tmp_path / "state")
    mp.start_processes(_worker, args=(2, case, free_port(), out), nprocs=2, start_method="fork")
    first, second = (json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1))
    # BatchNorm's running statistics are each worker's own (rank 0's are kept)
    learnt = [k for k in first if "running_" not in k]
    assert _difference(first, second, learnt) == 0.0
    if not CASES[case].get("stream") and not CASES[case].get("bn"):
        alone = _train(case, 0, 1)  # the same global batches in one process
        assert _difference(first, alone) < 1e-6
