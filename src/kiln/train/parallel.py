"""Data-parallel pieces of the training engine (:mod:`kiln.train.loop`): where a
worker stands in the run, the streaming source each worker reads its shard of, the
DDP wrapper, and the collectives the workers agree through.

The process group is the caller's (e.g. Ray Train's: gloo on the CPU, NCCL on CUDA).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class BatchStream(Protocol):
    """Training micro-batches read from storage, one epoch at a time (streaming data)."""

    @property
    def rows(self) -> int:
        """Training rows (all shards): the epoch's length for progress and schedules."""
        ...

    def batches(
        self, epoch: int, seed: int, batch: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's micro-batches of up to ``batch`` rows (x (B, F) float32, y (B,)
        int64 | float32) on the CPU, shuffled deterministically from ``(seed, epoch)``;
        every training row of the shard once per epoch."""
        ...

    def shard(self, rank: int, world: int) -> BatchStream:
        """The same stream restricted to data-parallel worker ``rank`` of ``world``
        (disjoint shards that together hold every training row)."""
        ...


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run (``torch.distributed`` initialised
    by the caller, e.g. Ray Train): worker ``rank`` of ``world``.

    Every worker builds the same run (same seed, same shuffle); each takes its share
    of every micro-batch (in memory: rows ``rank::world`` of it; streaming: its own
    shard), DDP averages the gradients, and the losses are scaled so that the step
    equals one of the whole global batch. Only rank 0 writes checkpoints.
    """

    rank: int
    world: int


def sharded(stream: BatchStream | None, parallel: DataParallel | None) -> BatchStream | None:
    """``stream``'s shard for this worker (the whole stream in one process)."""
    if stream is None or parallel is None:
        return stream
    return stream.shard(parallel.rank, parallel.world)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DDP (gloo on the CPU, NCCL on CUDA: the process group's)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":  # batch statistics over every worker's rows (CUDA only)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DistributedDataParallel(model, device_ids=ids)


def worker_mean(total: torch.Tensor, seen: float, device: torch.device) -> float:
    """Σ total / Σ seen over every worker (an all-reduce of both)."""
    import torch.distributed as dist

    both = torch.stack([total.detach().double(), torch.tensor(seen, dtype=torch.float64)])
    both = both.to(device)
    dist.all_reduce(both)
    return float(both[0]) / max(float(both[1]), 1)


def any_worker(mine: bool, device: torch.device) -> bool:
    """Whether any worker says yes (an all-reduce of the answers on ``device``)."""
    import torch.distributed as dist

    flag = torch.tensor([1.0 if mine else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
