"""What each Ray Train worker runs: the training engine on its share of the data.

:func:`train_worker` is Ray Train's ``train_loop_per_worker``. The process group is
Ray Train's (gloo on CPU, NCCL on GPU); the engine wraps the model in DDP itself
(:class:`kiln.train.loop.DataParallel`). Rank 0 relays its callbacks and checkpoints
through the run's :mod:`~kiln.jobs.executors.ray_channel`; every worker polls it for a
stop request at the same batches, so all of them stop together.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from typing import Any

import ray
import torch

from kiln.errors import DataError, KilnError
from kiln.train.callbacks import Callback, TrainSummary
from kiln.train.checkpoint import CheckpointState, EpochEntry
from kiln.train.executor import FitRequest
from kiln.train.loop import FitResult, fit_model
from kiln.train.parallel import DataParallel

STOP_EVERY = 32  # batches between stop checks (an actor call and an all-reduce each)
WATCH_SECONDS = 2.0  # how often a worker's watchdog asks whether the run was stopped
STOP_GRACE_SECONDS = 20.0  # after a stop, how long a worker may take to end by itself


class StopRequested(Exception):  # noqa: N818 - a request, not a failure
    """The driver asked the run to stop (the job was cancelled or lost its lease)."""


class _ChannelCheckpoints:
    """A CheckpointStore on the channel: everyone loads the latest; rank 0 saves."""

    def __init__(self, channel: Any, *, saves: bool) -> None:
        self.channel = channel
        self.saves = saves

    def save(self, state: CheckpointState) -> None:
        if self.saves:
            ray.get(self.channel.save.remote(state))

    def load(self) -> CheckpointState | None:
        state: CheckpointState | None = ray.get(self.channel.checkpoint.remote())
        return state

    def clear(self) -> None:
        """The driver clears the job's stored checkpoint once the version is registered."""


class _Relay(Callback):
    """Rank 0's callback events, put on the channel in order (batches coalesced)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.batches = 0
        self.tokens = 0

    def _flush(self) -> None:
        if self.batches:
            self.channel.put.remote("batches", self.batches)
            self.batches = 0
        if self.tokens:
            self.channel.put.remote("tokens", self.tokens)
            self.tokens = 0

    def on_train_start(self, epochs: int, start_epoch: int) -> None:
        self.channel.put.remote("train_start", [epochs, start_epoch])

    def on_epoch_start(self, batches: int) -> None:
        self.channel.put.remote("epoch_start", batches)

    def on_batch_tokens(self, tokens: int) -> None:
        self.tokens += tokens

    def on_batch_end(self) -> None:
        self.batches += 1
        if self.batches >= STOP_EVERY:
            self._flush()

    def on_epoch_end(self, logs: EpochEntry) -> None:
        self._flush()
        self.channel.put.remote("epoch_end", dict(logs))

    def on_train_end(self, summary: TrainSummary) -> None:
        self._flush()
        if "error" not in summary:  # a failed group may be restarted: the driver ends it
            ray.get(self.channel.put.remote("train_end", dict(summary)))


class _StopCheck(Callback):
    """Every worker asks the channel whether to stop, at the same batches and epochs
    (the engine keeps the workers in step, streaming too), and they agree (an all-reduce
    of their answers on ``device``, which NCCL needs), so all of them stop together."""

    def __init__(self, channel: Any, device: torch.device) -> None:
        self.channel = channel
        self.device = device
        self.batches = 0

    def _check(self) -> None:
        import torch.distributed as dist

        asked = ray.get(self.channel.stopped.remote())
        stop = torch.tensor([1.0 if asked else 0.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            raise StopRequested("the job asked its Ray workers to stop")

    def on_batch_end(self) -> None:
        self.batches += 1
        if self.batches % STOP_EVERY == 0:
            self._check()

    def on_epoch_end(self, logs: EpochEntry) -> None:
        self._check()


def _watch(channel: Any, done: threading.Event) -> None:
    """Once the driver asked to stop, give this worker ``STOP_GRACE_SECONDS`` to end on
    its own, then end its process: a worker waiting in a collective for a peer that
    already returned would otherwise wait for the collective's timeout. Ray then starts
    the group again, and the new workers see the stop and return at once."""
    while not done.wait(WATCH_SECONDS):
        try:
            stopped = ray.get(channel.stopped.remote())
        except ray.exceptions.RayError:
            stopped = True  # the driver (and its channel) is gone
        if stopped:
            if not done.wait(STOP_GRACE_SECONDS):
                os._exit(1)
            return


def _unreadable(exc: FileNotFoundError) -> DataError:
    node = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    return DataError(
        f"data.source: a Ray worker on node {node} cannot read the streaming source "
        f"({exc}); on a cluster of several machines it must be readable on every node "
        "(s3:// or a shared filesystem; a server's dataset is a copy on the kiln "
        "worker's machine)",
        field="data.source",
    )


def _placement(rank: int, config: dict[str, Any]) -> dict[str, Any]:
    context = ray.get_runtime_context()
    return {
        "rank": rank,
        "node_id": context.get_node_id(),
        "pid": os.getpid(),
        "cpus": float(config["cpus"]),
        "gpus": float(config["gpus"]),
    }


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's loop on one worker: fetch the run, train this rank, rank 0 reports."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    channel = config["channel"]
    ray.get(channel.hello.remote(_placement(rank, config)))
    model, request = ray.get(config["payload"][0])
    assert isinstance(request, FitRequest)
    torch.set_num_threads(max(1, int(config["cpus"])))
    train = request.train
    device = torch.device("cpu")
    if config["gpus"] > 0:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        train = train.model_copy(update={"device": "cuda"})
    callbacks: list[Callback] = [_StopCheck(channel, device)]
    if rank == 0:
        callbacks.insert(0, _Relay(channel))
    if ray.get(channel.stopped.remote()):
        return  # a group Ray restarted after the job was stopped
    done = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(channel, done), daemon=True)
    watchdog.start()
    try:
        result = _fit(model, request, train, channel, callbacks, rank, world)
    except StopRequested:
        return  # every worker returns: the run ends without a result (no retry by Ray)
    except KilnError as exc:
        # The driver fails the job with it. Returning (not raising) keeps Ray from
        # retrying a run that would fail the same way (the workers agree on the losses).
        ray.get(channel.fail.remote(exc.to_dict()))
        return
    except FileNotFoundError as exc:
        if request.data.stream is None:
            raise
        # a streaming source this node cannot read fails the job, it is not retried
        ray.get(channel.fail.remote(_unreadable(exc).to_dict()))
        return
    finally:
        done.set()
    if rank == 0:
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        ray.get(channel.finish.remote((weights, replace(result, device=str(result.device)))))


def _fit(
    model: Any,
    request: FitRequest,
    train: Any,
    channel: Any,
    callbacks: list[Callback],
    rank: int,
    world: int,
) -> FitResult:
    return fit_model(
        model,
        request.data,
        train,
        request.task,
        request.loss,
        target_scale=request.target_scale,
        callbacks=callbacks,
        checkpoints=_ChannelCheckpoints(channel, saves=rank == 0),
        resume=bool(ray.get(channel.has_checkpoint.remote())),
        run_id=request.run_id,
        augment=request.augment,
        criterion=request.criterion,
        parallel=DataParallel(rank=rank, world=world),
    )
