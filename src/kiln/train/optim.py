"""Optimizers and learning-rate schedules from the spec."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.optim import lr_scheduler

from kiln.spec.train import LRSchedule, OptimizerSpec


def make_optimizer(params: Any, spec: OptimizerSpec) -> torch.optim.Optimizer:
    kw: dict[str, Any] = {"lr": spec.lr, "weight_decay": spec.weight_decay}
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, momentum=spec.momentum or 0.0, nesterov=bool(spec.nesterov), **kw
        )
    if spec.name in ("adam", "adamw"):
        if spec.betas is not None:
            kw["betas"] = spec.betas
        cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
        return cls(params, **kw)
    if spec.name == "adagrad":
        return torch.optim.Adagrad(params, **kw)
    if spec.name == "rmsprop":
        return torch.optim.RMSprop(params, momentum=spec.momentum or 0.0, **kw)
    raise ValueError(f"unknown optimizer {spec.name!r}")


def make_schedule(
    optimizer: torch.optim.Optimizer,
    spec: LRSchedule,
    steps_per_epoch: int,
    epochs: int,
    mode: Literal["min", "max"] = "min",
) -> tuple[Any | None, bool]:
    """Build the schedule; returns (scheduler or None, whether it steps per optimizer step).

    Step-based schedules count optimizer steps (``step_epochs`` is converted), so the
    warm-up fraction means the same for any batch size. ``plateau`` steps per epoch on
    the monitored metric.
    """
    if spec.name == "plateau":
        sched = lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=spec.factor, patience=spec.patience, min_lr=spec.min_lr
        )
        return sched, False
    total = max(1, steps_per_epoch * epochs)
    warmup = int(spec.warmup * total)
    rest = max(1, total - warmup)
    base_lr = optimizer.param_groups[0]["lr"]
    main: Any
    if spec.name == "none":
        if not warmup:
            return None, True
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif spec.name == "step":
        main = lr_scheduler.StepLR(
            optimizer, step_size=spec.step_epochs * steps_per_epoch, gamma=spec.gamma
        )
    elif spec.name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=rest, eta_min=spec.min_lr)
    elif spec.name == "linear":
        end = min(1.0, spec.min_lr / base_lr) if base_lr else 0.0
        main = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=end, total_iters=rest)
    else:
        raise ValueError(f"unknown schedule {spec.name!r}")
    if not warmup:
        return main, True
    warm = lr_scheduler.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[warmup]), True
