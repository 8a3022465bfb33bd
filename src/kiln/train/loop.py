"""The training engine: fits an ``nn.Module`` on in-memory tensors.

Whole tensors live on the device and mini-batches are index slices of them (no
per-sample ``Dataset.__getitem__``), so the engine costs no more than a plain
PyTorch loop. The run is deterministic for a seed: shuffling uses its own
generator and the global RNG (dropout) is seeded, and both are saved in every
checkpoint, so ``resume`` continues exactly where an interrupted run stopped.

``fit_model`` builds one :class:`_Run` (everything the run holds), restores it from
a checkpoint when resuming, then runs epochs: each is one pass of micro-batches
(:func:`_train_epoch`), the epoch's logs (:func:`_epoch_logs`), early stopping
(:func:`_track_best`) and a checkpoint (:func:`_checkpoint_state`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kiln.data.lm_encode import IGNORE
from kiln.data.text import is_tokens, trim_padding
from kiln.errors import Interrupted, TrainingError
from kiln.runtime.placement import Placement
from kiln.spec.spec import metric_mode
from kiln.spec.train import TrainSpec
from kiln.train.callbacks import Callback, TrainSummary
from kiln.train.checkpoint import CheckpointState, CheckpointStore, EpochEntry, Progress
from kiln.train.early_stopping import EpochChoice, monitored_value, smoothing_factor
from kiln.train.losses import make_loss, penalised_parameters, weight_penalty
from kiln.train.optim import make_optimizer, make_schedule
from kiln.train.parallel import (
    BatchStream,
    DataParallel,
    any_worker,
    sharded,
    worker_mean,
    wrap_ddp,
)
from kiln.train.validation import Validator

if TYPE_CHECKING:
    from kiln.train.executor import Executor


@dataclass
class TensorData:
    """Encoded splits: features (N, F) float32; targets (N,) int64 or float32."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    # streaming data: training batches come from here (x_train/y_train are ignored)
    stream: BatchStream | None = field(default=None, kw_only=True)


@dataclass
class FitResult:
    """What training produced, besides the (trained, best-restored) model itself."""

    history: list[EpochEntry]
    epochs_run: int
    best_epoch: int | None
    stopped_early: bool
    seconds: float
    device: str
    resumed_from: int = 0
    # set by k-fold early stopping: how the epoch count was chosen (None: by this run)
    epoch_choice: EpochChoice | None = None


def fit_model(
    model: nn.Module,
    data: TensorData,
    train: TrainSpec,
    task: str,
    loss: str,
    *,
    target_scale: float = 1.0,
    callbacks: Sequence[Callback] = (),
    checkpoints: CheckpointStore | None = None,
    resume: bool = False,
    run_id: str = "",
    augment: nn.Module | None = None,
    criterion: nn.Module | None = None,
    executor: Executor | None = None,
    parallel: DataParallel | None = None,
) -> FitResult:
    """Train ``model`` in place per ``train``; returns the history and how it ended.

    With an ``executor`` and ``train.resources`` set, the run happens there (e.g. on a
    Ray cluster, :mod:`kiln.train.executor`), which calls this function again on every
    worker with its ``parallel`` place; ``model`` gets the trained weights.

    ``augment`` transforms training batches only (image augmentation). ``criterion``
    replaces the loss named by ``loss`` (e.g. a distillation loss). Token inputs
    (B, 2, L) are trimmed to each batch's longest row.

    ``target_scale`` converts regression errors back to the target's units for the
    logged metrics. ``run_id`` (spec + data fingerprint) guards ``resume`` against a
    checkpoint from a different run.
    """
    if executor is not None and train.resources is not None and parallel is None:
        from kiln.train.executor import FitRequest

        request = FitRequest(
            data=data,
            train=train,
            task=task,
            loss=loss,
            target_scale=target_scale,
            run_id=run_id,
            augment=augment,
            criterion=criterion,
        )
        return executor.fit(
            model, request, callbacks=callbacks, checkpoints=checkpoints, resume=resume
        )
    if parallel is not None and parallel.world == 1:
        parallel = None  # one worker: DDP would only add its bucket copies
    placement = Placement.for_training(train.device, train.mixed_precision)
    started = time.perf_counter()
    run = _Run.start(
        model,
        data,
        train,
        placement,
        task=task,
        loss_fn=criterion if criterion is not None else make_loss(loss),
        target_scale=target_scale,
        augment=augment,
        callbacks=callbacks,
        checkpoints=checkpoints,
        run_id=run_id,
        parallel=parallel,
    )
    progress = _restore(run) if resume else Progress()
    start_epoch = progress.epoch
    for cb in callbacks:
        cb.on_train_start(train.epochs, start_epoch)
    _guarded_epochs(run, progress)
    return _finish(run, progress, started, start_epoch)


@dataclass(slots=True)
class _Run:
    """Everything one training run holds, built once by :meth:`start`.

    The training and validation tensors are on ``device`` already; an epoch slices
    ``x``/``y`` into ``n_batches`` micro-batches of ``batch`` rows and steps the
    optimizer every ``accum`` of them. The fields after ``run_id`` follow from the
    others (``__post_init__``).
    """

    model: nn.Module
    train: TrainSpec
    task: str
    device: torch.device
    autocast: Any  # the context every forward runs in (bf16 autocast or nothing)
    x: torch.Tensor
    y: torch.Tensor
    val: tuple[torch.Tensor, torch.Tensor] | None
    augment: nn.Module | None
    loss_fn: nn.Module
    target_scale: float
    callbacks: Sequence[Callback]
    checkpoints: CheckpointStore | None
    run_id: str
    stream: BatchStream | None  # streaming data (this worker's shard); else x/y
    parallel: DataParallel | None
    # what forward and backward run through: the model, or its DDP wrapper
    forward: nn.Module = field(init=False)
    batch: int = field(init=False)
    accum: int = field(init=False)
    n_batches: int = field(init=False)
    tokens: bool = field(init=False)  # (B, 2, L) token inputs, trimmed per batch
    has_batchnorm: bool = field(init=False)  # BatchNorm cannot train on a 1-row batch
    penalised: list[nn.Parameter] = field(init=False)  # what L1/L2 apply to
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: Any = field(init=False)
    per_step: bool = field(init=False)  # scheduler steps per optimizer step, else per epoch
    monitor: str | None = field(init=False)  # the early-stopping metric
    plateau_metric: str = field(init=False)
    shuffle_gen: torch.Generator = field(init=False)
    batch_hooks: list[Callable[[], None]] = field(init=False)
    token_hooks: list[Callable[[int], None]] = field(init=False)  # tokens per micro-batch
    validator: Validator = field(init=False)  # the epoch's val_* logs
    # generation: labelled tokens per row (N,); the token loss is a mean over tokens, so
    # micro-batches are weighted by their tokens, not their rows (None: by rows)
    row_weights: torch.Tensor | None = field(init=False)

    @classmethod
    def start(
        cls,
        model: nn.Module,
        data: TensorData,
        train: TrainSpec,
        placement: Placement,
        *,
        task: str,
        loss_fn: nn.Module,
        target_scale: float,
        augment: nn.Module | None,
        callbacks: Sequence[Callback],
        checkpoints: CheckpointStore | None,
        run_id: str,
        parallel: DataParallel | None = None,
    ) -> _Run:
        """Seed the run and move the model, the augmentation and the data to the device."""
        device = placement.device
        torch.manual_seed(train.seed)
        model.to(device)
        if augment is not None:
            augment.to(device)
        return cls(
            model=model,
            train=train,
            task=task,
            device=device,
            autocast=placement.autocast(),
            x=data.x_train.to(device),
            y=data.y_train.to(device),
            val=_validation_tensors(data, device),
            augment=augment,
            loss_fn=loss_fn,
            target_scale=target_scale,
            callbacks=callbacks,
            checkpoints=checkpoints,
            run_id=run_id,
            stream=sharded(data.stream, parallel),
            parallel=parallel,
        )

    def __post_init__(self) -> None:
        train = self.train
        n = self.stream.rows if self.stream is not None else len(self.x)
        self.forward = wrap_ddp(self.model, self.device) if self.parallel else self.model
        self.shuffle_gen = torch.Generator().manual_seed(train.seed)
        self.batch = n if train.batch_size == "full" else min(int(train.batch_size), n)
        self.accum = train.gradient_accumulation
        self.n_batches = math.ceil(n / self.batch)
        self.tokens = is_tokens(self.x)
        self.has_batchnorm = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()
        )
        self.penalised = penalised_parameters(self.model)
        self.optimizer = make_optimizer(self.model.parameters(), train.optimizer)
        self.monitor = train.early_stopping.metric if train.early_stopping else None
        self.plateau_metric = self.monitor or "val_loss"
        self.scheduler, self.per_step = make_schedule(
            self.optimizer,
            train.lr_schedule,
            math.ceil(self.n_batches / self.accum),  # optimizer steps per epoch
            train.epochs,
            metric_mode(self.plateau_metric),
        )
        # only callbacks that override the per-batch hook are called per batch
        self.batch_hooks = [
            cb.on_batch_end
            for cb in self.callbacks
            if type(cb).on_batch_end is not Callback.on_batch_end
        ]
        self.row_weights = _labelled_tokens(self.y) if self.task == "generation" else None
        self.validator = Validator(
            task=self.task,
            loss_fn=self.loss_fn,
            autocast=self.autocast,
            monitor=self.monitor,
            target_scale=self.target_scale,
            batch=self.batch,
        )
        self.token_hooks = [
            cb.on_batch_tokens
            for cb in self.callbacks
            if self.tokens and type(cb).on_batch_tokens is not Callback.on_batch_tokens
        ]


def _labelled_tokens(y: torch.Tensor) -> torch.Tensor:
    """Tokens each row's next-token loss is taken on (labels (N, L), or (N, C, L) with
    the labels first), as float weights (N,)."""
    labels = y[:, 0] if y.dim() == 3 else y
    return (labels[:, 1:] != IGNORE).sum(dim=1).to(torch.float32)


def _validation_tensors(
    data: TensorData, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The validation split on ``device``; None when there is none (or it is empty)."""
    if data.x_val is None or not len(data.x_val) or data.y_val is None:
        return None
    return data.x_val.to(device), data.y_val.to(device)


def _checkpoint_state(run: _Run, progress: Progress) -> CheckpointState:
    """All a resume needs: weights, optimizer, schedule, both RNGs, and the progress."""
    cuda = run.device.type == "cuda"
    return {
        "run_id": run.run_id,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else {},
        "shuffle_rng": run.shuffle_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if cuda else [],
        **progress.to_checkpoint(),
    }


def _restore(run: _Run) -> Progress:
    """Load the checkpoint into ``run`` (the inverse of :func:`_checkpoint_state`).

    A TrainingError on ``resume`` when there is no checkpoint or it is another run's.
    """
    state = run.checkpoints.load() if run.checkpoints is not None else None
    if state is None:
        raise TrainingError("nothing to resume: no checkpoint found", field="resume")
    if state["run_id"] != run.run_id:
        raise TrainingError(
            "the checkpoint was made with a different spec or data; "
            "train without --resume to start over",
            field="resume",
        )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    run.shuffle_gen.set_state(state["shuffle_rng"])
    torch.set_rng_state(state["torch_rng"])
    if run.device.type == "cuda" and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress.from_checkpoint(state)


def _guarded_epochs(run: _Run, progress: Progress) -> None:
    """Train the remaining epochs; callbacks hear the end on an interrupt or an error.

    A KeyboardInterrupt becomes :class:`~kiln.errors.Interrupted` (the last completed
    epoch's checkpoint is kept for ``--resume``).
    """
    try:
        _epochs(run, progress)
    except KeyboardInterrupt:
        for cb in run.callbacks:
            cb.on_train_end({"interrupted": True, "epochs_run": len(progress.history)})
        raise Interrupted(
            f"training interrupted after epoch {len(progress.history)}; "
            "the last checkpoint is kept, continue with --resume"
        ) from None
    except BaseException as exc:
        # Callbacks still hear the end (closing files, stopping live displays).
        for cb in run.callbacks:
            cb.on_train_end({"error": str(exc), "epochs_run": len(progress.history)})
        raise


def _epochs(run: _Run, progress: Progress) -> None:
    """Epochs from ``progress.epoch`` on, each logged, checkpointed and announced."""
    start = progress.epoch
    saves = run.checkpoints is not None and (run.parallel is None or run.parallel.rank == 0)
    # A run that had already stopped early resumes straight to the end.
    for epoch in range(start, start if progress.stopped_early else run.train.epochs):
        t0 = time.perf_counter()
        loss = _stream_epoch(run, epoch) if run.stream is not None else _train_epoch(run)
        logs = _epoch_logs(run, epoch, loss)
        logs["seconds"] = time.perf_counter() - t0
        if run.scheduler is not None and not run.per_step:
            run.scheduler.step(logs[run.plateau_metric])
        _track_best(run, progress, logs)
        progress.history.append(logs)
        progress.epoch = epoch + 1
        if saves:
            assert run.checkpoints is not None
            run.checkpoints.save(_checkpoint_state(run, progress))
        for cb in run.callbacks:
            cb.on_epoch_end(logs)
        if progress.stopped_early:
            break


def _train_epoch(run: _Run) -> float:
    """One shuffled pass over the training rows; the mean training loss per row (per
    labelled token for generation)."""
    run.model.train()
    perm = torch.randperm(len(run.x), generator=run.shuffle_gen).to(run.device)
    total = torch.zeros((), device=run.device)
    seen = 0.0
    run.optimizer.zero_grad(set_to_none=True)
    pending = False  # gradients accumulated since the last optimizer step
    for cb in run.callbacks:
        cb.on_epoch_start(run.n_batches)
    for b in range(run.n_batches):
        idx = perm[b * run.batch : (b + 1) * run.batch]
        if _trainable(run, len(idx)):
            last = _last_of_step(run, b)
            mine = _my_rows(run, idx)
            if run.row_weights is None:
                weight, share = float(len(mine)), len(mine) * _world(run) / _group_rows(run, b)
            else:
                weight, share = _token_share(run, perm, b, mine)
            seen += weight
            with _syncing(run, last):
                total += _backward(run, mine if len(mine) else idx[:1], share) * weight
            pending = True
        if pending and ((b + 1) % run.accum == 0 or b == run.n_batches - 1):
            pending = False
            _optimizer_step(run)
        if run.token_hooks:
            n_tokens = int(run.x[idx, 1].sum())
            for token_hook in run.token_hooks:
                token_hook(n_tokens)
        for hook in run.batch_hooks:
            hook()
    return _mean_loss(run, total, seen)


def _last_of_step(run: _Run, b: int) -> bool:
    """Whether micro-batch ``b`` is the last that trains before an optimizer step (so
    DDP averages the gradients on its backward): the step's last, the epoch's last, or
    the one before an epoch's last batch too small to train."""
    if (b + 1) % run.accum == 0 or b == run.n_batches - 1:
        return True
    following = min(run.batch, len(run.x) - (b + 1) * run.batch)
    return b + 1 == run.n_batches - 1 and not _trainable(run, following)


def _trainable(run: _Run, rows: int) -> bool:
    """Whether a micro-batch of ``rows`` (global) rows can train: BatchNorm needs 2+
    rows on every worker."""
    return not (run.has_batchnorm and rows // _world(run) < 2)


def _my_rows(run: _Run, idx: torch.Tensor) -> torch.Tensor:
    """This worker's rows of the global micro-batch ``idx`` (all of them in one process)."""
    if run.parallel is None:
        return idx
    return idx[run.parallel.rank :: run.parallel.world]


def _syncing(run: _Run, last: bool) -> Any:
    """DDP averages gradients on the backward of an optimizer step's last micro-batch
    only; the others accumulate locally (``no_sync``)."""
    if run.parallel is None or last:
        return nullcontext()
    no_sync: Callable[[], Any] = run.forward.no_sync  # type: ignore[assignment]
    return no_sync()


def _mean_loss(run: _Run, total: torch.Tensor, seen: float) -> float:
    """The epoch's mean training loss over every worker's rows."""
    if run.parallel is None:
        return float(total) / max(seen, 1)
    return worker_mean(total, seen, run.device)


def _stream_epoch(run: _Run, epoch: int) -> float:
    """One pass over a streaming source's training rows (this worker's shard); the mean
    training loss per row.

    Micro-batches are weighted by their rows' share of a full optimizer step (``batch``
    x ``accum`` rows): the last, short step of an epoch weighs a little less than it
    would in memory. Under DDP the shards may hold different numbers of batches: the
    workers agree before each micro-batch whether any of them has one left (an
    all-reduce), and one that has run out trains a stand-in batch with no weight. So
    every worker takes the same steps, with the same averaged gradients, and their
    weights and optimizer states stay equal.
    """
    assert run.stream is not None
    run.model.train()
    world = _world(run)
    local_batch = max(1, run.batch // world)
    total = torch.zeros((), device=run.device)
    seen = 0.0
    run.optimizer.zero_grad(set_to_none=True)
    for cb in run.callbacks:
        cb.on_epoch_start(run.n_batches)
    batches = iter(run.stream.batches(epoch, run.train.seed, local_batch))
    upcoming = _next_trainable(run, batches)
    more = _anyone(run, upcoming is not None)
    stand_in = _stand_in(run)
    b = 0
    while more:
        current, upcoming = upcoming, _next_trainable(run, batches)
        more = _anyone(run, upcoming is not None)
        if current is not None:
            stand_in = current
        xb, yb = current if current is not None else stand_in
        rows = len(xb) if current is not None else 0
        last = (b + 1) % run.accum == 0 or not more
        # a share of the step's rows; DDP averages over the workers, hence x world
        share = rows * world / (local_batch * world * run.accum)
        with _syncing(run, last):
            loss = _backward_on(run, xb.to(run.device), yb.to(run.device), share)
        total += loss * rows
        seen += rows
        if last:
            _optimizer_step(run)
        for hook in run.batch_hooks:
            hook()
        b += 1
    return _mean_loss(run, total, seen)


def _next_trainable(
    run: _Run, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The next micro-batch that can train (BatchNorm: 2+ rows); None past the last."""
    for xb, yb in batches:
        if len(xb) and not (run.has_batchnorm and len(xb) < 2):
            return xb, yb
    return None


def _anyone(run: _Run, mine: bool) -> bool:
    """Whether any worker says yes (just ``mine`` in one process)."""
    return mine if run.parallel is None else any_worker(mine, run.device)


def _stand_in(run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of zeros shaped like the stream's (x, y), for a worker with no batch."""
    x = torch.zeros((2, *run.x.shape[1:]), dtype=run.x.dtype)
    return x, torch.zeros((2, *run.y.shape[1:]), dtype=run.y.dtype)


def _group_rows(run: _Run, b: int) -> int:
    """Rows in the optimizer step that micro-batch ``b`` belongs to.

    The last group of an epoch may be short. Each micro-batch's mean loss is weighted
    by its share of these rows, so the accumulated gradient equals that of one batch
    of all those rows.
    """
    first = (b // run.accum) * run.accum
    return min(len(run.x), (first + run.accum) * run.batch) - first * run.batch


def _world(run: _Run) -> int:
    return run.parallel.world if run.parallel is not None else 1


def _token_share(run: _Run, perm: torch.Tensor, b: int, mine: torch.Tensor) -> tuple[float, float]:
    """(labelled tokens of this worker's rows ``mine`` of micro-batch ``b``, their share
    of its optimizer step's, times the world size): the token-mean losses of the
    micro-batches, weighted so, add up to the token mean of one batch of the whole step
    (DDP divides the workers' summed gradients by the world size)."""
    assert run.row_weights is not None
    first = (b // run.accum) * run.accum
    group = perm[first * run.batch : (first + run.accum) * run.batch]
    tokens = float(run.row_weights[mine].sum())
    return tokens, tokens * _world(run) / max(float(run.row_weights[group].sum()), 1.0)


def _backward(run: _Run, idx: torch.Tensor, share: float) -> torch.Tensor:
    """Forward and backward of the micro-batch ``idx`` (rows of the in-memory split)."""
    return _backward_on(run, run.x[idx], run.y[idx], share)


def _backward_on(run: _Run, xb: torch.Tensor, yb: torch.Tensor, share: float) -> torch.Tensor:
    """Forward and backward of a micro-batch, its loss scaled by ``share`` (of the
    optimizer step) for the gradient; returns its mean loss (detached)."""
    if run.tokens:
        xb = trim_padding(xb)
    if run.augment is not None:
        xb = run.augment(xb)
    with run.autocast:
        out = run.forward(xb)
        step_loss = run.loss_fn(out.float(), yb)
    objective = step_loss
    reg = run.train.regularization
    penalty = weight_penalty(run.penalised, reg.l1, reg.l2)
    if penalty is not None:
        objective = objective + penalty
    (objective * share if share != 1 else objective).backward()
    mean: torch.Tensor = step_loss.detach()
    return mean


def _optimizer_step(run: _Run) -> None:
    """Clip, step and clear the accumulated gradients; per-step schedules advance."""
    if run.train.grad_clip is not None:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.train.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.scheduler is not None and run.per_step:
        run.scheduler.step()


def _epoch_logs(run: _Run, epoch: int, train_loss: float) -> EpochEntry:
    """The epoch's logs (``epoch``, ``train_loss``, ``lr``, ``val_*``).

    A non-finite training loss is a TrainingError naming the learning rate.
    """
    if not math.isfinite(train_loss):
        raise TrainingError(
            f"training diverged at epoch {epoch + 1} (loss is {train_loss}); "
            "lower train.optimizer.lr or set train.grad_clip",
            field="train.optimizer.lr",
        )
    logs: EpochEntry = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "lr": run.optimizer.param_groups[0]["lr"],
    }
    if run.val is not None:
        logs.update(run.validator(run.model, *run.val))
    return logs


def _track_best(run: _Run, progress: Progress, logs: EpochEntry) -> None:
    """Early stopping: remember the best epoch (and its weights), count the others."""
    stopping = run.train.early_stopping
    if stopping is None or run.monitor is None:
        return
    val_rows = len(run.val[0]) if run.val is not None else None
    alpha = smoothing_factor(stopping.smoothing, run.monitor, val_rows)
    value = monitored_value(logs, run.monitor, progress.history, alpha)
    if _improved(value, progress.best_value, metric_mode(run.monitor), stopping.min_delta):
        progress.best_value, progress.best_epoch = value, int(logs["epoch"])
        progress.bad_epochs = 0
        progress.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    else:
        progress.bad_epochs += 1
    progress.stopped_early = progress.bad_epochs >= stopping.patience


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _finish(run: _Run, progress: Progress, started: float, start_epoch: int) -> FitResult:
    """Restore the best weights if asked, leave the model in eval mode, report the end."""
    stopping = run.train.early_stopping
    if stopping and stopping.restore_best and progress.best_state is not None:
        run.model.load_state_dict(progress.best_state)
    run.model.eval()
    result = FitResult(
        history=progress.history,
        epochs_run=len(progress.history),
        best_epoch=progress.best_epoch,
        stopped_early=progress.stopped_early,
        seconds=time.perf_counter() - started,
        device=str(run.device),
        resumed_from=start_epoch,
    )
    summary: TrainSummary = {
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "seconds": result.seconds,
    }
    for cb in run.callbacks:
        cb.on_train_end(summary)
    return result
