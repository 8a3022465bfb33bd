"""The training engine: fits an ``nn.Module`` on in-memory tensors.

Whole tensors live on the device and mini-batches are index slices of them (no
per-sample ``Dataset.__getitem__``), so the engine costs no more than a plain
PyTorch loop. The run is deterministic for a seed: shuffling uses its own
generator and the global RNG (dropout) is seeded, and both are saved in every
checkpoint, so ``resume`` continues exactly where an interrupted run stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.data.text import is_tokens, trim_padding
from kiln.errors import Interrupted, TrainingError
from kiln.runtime.placement import Placement, predict_outputs
from kiln.spec.spec import metric_mode
from kiln.spec.train import TrainSpec
from kiln.train.callbacks import Callback
from kiln.train.checkpoint import CheckpointStore
from kiln.train.losses import make_loss, penalised_parameters, weight_penalty
from kiln.train.optim import make_optimizer, make_schedule


@dataclass
class TensorData:
    """Encoded splits: features (N, F) float32; targets (N,) int64 or float32."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None


@dataclass
class FitResult:
    """What training produced, besides the (trained, best-restored) model itself."""

    history: list[dict[str, Any]]
    epochs_run: int
    best_epoch: int | None
    stopped_early: bool
    seconds: float
    device: str
    resumed_from: int = 0


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
) -> FitResult:
    """Train ``model`` in place per ``train``; returns the history and how it ended.

    ``augment`` transforms training batches only (image augmentation). ``criterion``
    replaces the loss named by ``loss`` (e.g. a distillation loss). Token inputs
    (B, 2, L) are trimmed to each batch's longest row.

    ``target_scale`` converts regression errors back to the target's units for the
    logged metrics. ``run_id`` (spec + data fingerprint) guards ``resume`` against a
    checkpoint from a different run.
    """
    placement = Placement.for_training(train.device, train.mixed_precision)
    device = placement.device
    started = time.perf_counter()
    torch.manual_seed(train.seed)
    shuffle_gen = torch.Generator().manual_seed(train.seed)

    model.to(device)
    x, y = data.x_train.to(device), data.y_train.to(device)
    xv = data.x_val.to(device) if data.x_val is not None and len(data.x_val) else None
    yv = data.y_val.to(device) if xv is not None and data.y_val is not None else None
    n = len(x)
    batch = n if train.batch_size == "full" else min(int(train.batch_size), n)
    accum = train.gradient_accumulation
    n_batches = math.ceil(n / batch)
    steps_per_epoch = math.ceil(n_batches / accum)
    tokens = is_tokens(x)
    if augment is not None:
        augment.to(device)
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

    loss_fn = criterion if criterion is not None else make_loss(loss)
    penalised = penalised_parameters(model)
    reg = train.regularization
    optimizer = make_optimizer(model.parameters(), train.optimizer)
    monitor = train.early_stopping.metric if train.early_stopping else None
    plateau_metric = monitor or "val_loss"
    scheduler, per_step = make_schedule(
        optimizer, train.lr_schedule, steps_per_epoch, train.epochs, metric_mode(plateau_metric)
    )
    autocast = placement.autocast()

    progress = _Progress()
    if resume:
        state = checkpoints.load() if checkpoints is not None else None
        if state is None:
            raise TrainingError("nothing to resume: no checkpoint found", field="resume")
        if state["run_id"] != run_id:
            raise TrainingError(
                "the checkpoint was made with a different spec or data; "
                "train without --resume to start over",
                field="resume",
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        shuffle_gen.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        progress = _Progress.from_checkpoint(state)
    start_epoch = progress.epoch

    for cb in callbacks:
        cb.on_train_start(train.epochs, start_epoch)
    # only callbacks that override the per-batch hook are called per batch
    batch_hooks = [
        cb.on_batch_end for cb in callbacks if type(cb).on_batch_end is not Callback.on_batch_end
    ]

    try:
        # A run that had already stopped early resumes straight to the end.
        for epoch in range(start_epoch, start_epoch if progress.stopped_early else train.epochs):
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(n, generator=shuffle_gen).to(device)
            total = torch.zeros((), device=device)
            seen = 0
            optimizer.zero_grad(set_to_none=True)
            pending = False  # gradients accumulated since the last optimizer step
            for b in range(n_batches):
                idx = perm[b * batch : (b + 1) * batch]
                # Rows in this optimizer step's micro-batches (the last group may be short):
                # each micro-batch's mean loss is weighted by its share of them, so the
                # accumulated gradient equals that of one batch of all those rows.
                first = (b // accum) * accum
                group_rows = min(n, (first + accum) * batch) - first * batch
                if not (has_batchnorm and len(idx) == 1):  # BatchNorm needs 2+ rows
                    seen += len(idx)
                    xb = x[idx]
                    if tokens:
                        xb = trim_padding(xb)
                    if augment is not None:
                        xb = augment(xb)
                    with autocast:
                        out = model(xb)
                        step_loss = loss_fn(out.float(), y[idx])
                    objective = step_loss
                    penalty = weight_penalty(penalised, reg.l1, reg.l2)
                    if penalty is not None:
                        objective = objective + penalty
                    share = len(idx) / group_rows
                    (objective * share if share < 1 else objective).backward()
                    total += step_loss.detach() * len(idx)
                    pending = True
                if pending and ((b + 1) % accum == 0 or b == n_batches - 1):
                    pending = False
                    if train.grad_clip is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if scheduler is not None and per_step:
                        scheduler.step()
                for hook in batch_hooks:
                    hook()
            train_loss = float(total) / max(seen, 1)
            if not math.isfinite(train_loss):
                raise TrainingError(
                    f"training diverged at epoch {epoch + 1} (loss is {train_loss}); "
                    "lower train.optimizer.lr or set train.grad_clip",
                    field="train.optimizer.lr",
                )
            logs: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "lr": optimizer.param_groups[0]["lr"],
            }
            if xv is not None and yv is not None:
                logs.update(
                    _validate(model, xv, yv, loss_fn, task, target_scale, autocast, monitor)
                )
            logs["seconds"] = time.perf_counter() - t0

            if scheduler is not None and not per_step:
                scheduler.step(logs[plateau_metric])
            if monitor is not None:
                assert train.early_stopping is not None
                value = float(logs[monitor])
                if _improved(
                    value,
                    progress.best_value,
                    metric_mode(monitor),
                    train.early_stopping.min_delta,
                ):
                    progress.best_value, progress.best_epoch = value, epoch + 1
                    progress.bad_epochs = 0
                    progress.best_state = {
                        k: v.detach().clone() for k, v in model.state_dict().items()
                    }
                else:
                    progress.bad_epochs += 1
                progress.stopped_early = progress.bad_epochs >= train.early_stopping.patience
            progress.history.append(logs)
            progress.epoch = epoch + 1

            if checkpoints is not None:
                checkpoints.save(
                    {
                        "run_id": run_id,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else {},
                        "shuffle_rng": shuffle_gen.get_state(),
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                        **progress.to_checkpoint(),
                    }
                )
            for cb in callbacks:
                cb.on_epoch_end(logs)
            if progress.stopped_early:
                break
    except KeyboardInterrupt:
        for cb in callbacks:
            cb.on_train_end({"interrupted": True, "epochs_run": len(progress.history)})
        raise Interrupted(
            f"training interrupted after epoch {len(progress.history)}; "
            "the last checkpoint is kept, continue with --resume"
        ) from None
    except BaseException as exc:
        # Callbacks still hear the end (closing files, stopping live displays).
        for cb in callbacks:
            cb.on_train_end({"error": str(exc), "epochs_run": len(progress.history)})
        raise

    best_state = progress.best_state
    if train.early_stopping and train.early_stopping.restore_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    history = progress.history
    best_epoch = progress.best_epoch
    stopped_early = progress.stopped_early
    result = FitResult(
        history=history,
        epochs_run=len(history),
        best_epoch=best_epoch,
        stopped_early=stopped_early,
        seconds=time.perf_counter() - started,
        device=str(device),
        resumed_from=start_epoch,
    )
    summary = {
        "epochs_run": result.epochs_run,
        "best_epoch": best_epoch,
        "stopped_early": stopped_early,
        "seconds": result.seconds,
    }
    for cb in callbacks:
        cb.on_train_end(summary)
    return result


@dataclass
class _Progress:
    """Where a run stands after its last completed epoch (what a checkpoint restores)."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    stopped_early: bool = False

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "history": self.history,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
        }

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> _Progress:
        return cls(
            epoch=state["epoch"],
            history=list(state["history"]),
            best_value=state["best_value"],
            best_epoch=state["best_epoch"],
            best_state=state["best_state"],
            bad_epochs=state["bad_epochs"],
            stopped_early=bool(state.get("stopped_early", False)),
        )


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _validate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    task: str,
    target_scale: float,
    autocast: Any,
    monitor: str | None,
) -> dict[str, float]:
    """val_loss and the headline metric every epoch; the full set only when monitored.

    Kept lean on purpose: this runs every epoch and is part of the engine's overhead.
    """
    from kiln.evaluate.metrics import classification_metrics, regression_metrics

    out = predict_outputs(model, x, autocast)
    logs = {"val_loss": float(loss_fn(out, y))}
    if task == "classification":
        from sklearn.metrics import accuracy_score

        true = y.cpu().numpy()
        logs["val_accuracy"] = float(accuracy_score(true, out.argmax(dim=1).cpu().numpy()))
        if monitor is not None and monitor not in logs and monitor != "train_loss":
            proba = torch.softmax(out, dim=1).cpu().numpy()
            full = classification_metrics(true, proba, n_classes=out.shape[1])
            logs[monitor] = full[monitor.removeprefix("val_")]
    else:
        pred = out.squeeze(-1).cpu().numpy().astype(np.float64) * target_scale
        true = y.cpu().numpy().astype(np.float64) * target_scale
        for key, value in regression_metrics(true, pred).items():
            logs[f"val_{key}"] = value
    return logs
