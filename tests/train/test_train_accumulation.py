"""Gradient accumulation and mixed precision in the training engine.

Accumulating ``k`` micro-batches takes one optimizer step per ``k`` batches, and since
the loss is a mean, one accumulated step over equal micro-batches is the same step as
one over their union: with SGD the weights agree with full-batch training to rounding.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import kiln
from kiln.models import build
from kiln.spec import LinearSpec, MLPSpec, TrainSpec
from kiln.train.loop import TensorData, fit_model


def class_data(n: int, features: int = 5, classes: int = 3, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(dim=1)
    return TensorData(x, y)


def reg_data(n: int, features: int = 4, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = x @ torch.randn(features, generator=g) + 0.1 * torch.randn(n, generator=g)
    return TensorData(x, y.float())


def fresh_model(data: TensorData, task: str, spec=None) -> nn.Module:
    torch.manual_seed(0)
    n_out = int(data.y_train.max()) + 1 if task == "classification" else 1
    # No dropout, no batch norm: the forward pass does not depend on how rows are batched.
    return build(spec or MLPSpec(hidden=[8]), data.x_train.shape[1], n_out)


def run(data: TensorData, task: str = "classification", model=None, **train) -> nn.Module:
    model = model or fresh_model(data, task)
    loss = "cross_entropy" if task == "classification" else "mse"
    spec = TrainSpec(**{"device": "cpu", "optimizer": {"name": "sgd", "lr": 0.1}, **train})
    fit_model(model, data, spec, task, loss)
    return model


@pytest.fixture
def count_steps():
    steps: list[int] = []
    handle = register_optimizer_step_post_hook(lambda *args: steps.append(1))
    yield steps
    handle.remove()


@pytest.mark.parametrize(
    ("n", "batch_size", "accumulation", "steps_per_epoch"),
    [
        (32, 8, 1, 4),
        (32, 8, 2, 2),  # half the optimizer steps
        (32, 8, 4, 1),
        (32, 8, 3, 2),  # 4 micro-batches: a group of 3, then a short group of 1
        (40, 8, 2, 3),  # 5 micro-batches: 2 + 2 + 1
        (32, "full", 2, 1),
    ],
)
def test_accumulation_divides_the_optimizer_steps(
    count_steps, n, batch_size, accumulation, steps_per_epoch
):
    run(class_data(n), epochs=3, batch_size=batch_size, gradient_accumulation=accumulation)
    assert len(count_steps) == 3 * steps_per_epoch


def test_accumulation_two_halves_the_steps_of_accumulation_one(count_steps):
    data = class_data(64)
    run(data, epochs=2, batch_size=8, gradient_accumulation=1)
    one = len(count_steps)
    count_steps.clear()
    run(data, epochs=2, batch_size=8, gradient_accumulation=2)
    assert len(count_steps) * 2 == one == 16


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize(("n", "batch_size", "accumulation"), [(16, 8, 2), (24, 6, 4)])
def test_accumulated_step_equals_the_full_batch_step(task, n, batch_size, accumulation):
    data = class_data(n) if task == "classification" else reg_data(n)
    full = run(data, task, epochs=3, batch_size="full")
    accumulated = run(
        data, task, epochs=3, batch_size=batch_size, gradient_accumulation=accumulation
    )
    not_accumulated = run(data, task, epochs=3, batch_size=batch_size)
    want = full.state_dict()
    for name, value in accumulated.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6, msg=name)
    # ...while plain mini-batches of the same size take different steps.
    other = not_accumulated.state_dict()
    assert any(not torch.allclose(other[k], want[k], atol=1e-4) for k in want)


def test_weight_penalty_is_counted_once_per_optimizer_step():
    data = reg_data(16)
    reg = {"l2": 0.1, "l1": 0.01}
    full = run(data, "regression", epochs=2, batch_size="full", regularization=reg)
    acc = run(
        data, "regression", epochs=2, batch_size=8, gradient_accumulation=2, regularization=reg
    )
    for a, b in zip(full.state_dict().values(), acc.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_accumulated_step_with_a_short_micro_batch_equals_the_full_batch_step():
    data = reg_data(12)  # micro-batches of 8 and 4 rows
    full = run(data, "regression", epochs=1, batch_size="full")
    accumulated = run(data, "regression", epochs=1, batch_size=8, gradient_accumulation=2)
    for a, b in zip(full.state_dict().values(), accumulated.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_schedules_count_optimizer_steps_not_micro_batches():
    """A linear schedule reaches its end exactly at the last optimizer step."""
    data = class_data(64)
    model = fresh_model(data, "classification", LinearSpec())
    spec = TrainSpec(
        device="cpu",
        epochs=4,
        batch_size=8,
        gradient_accumulation=2,
        optimizer={"name": "sgd", "lr": 0.1},
        lr_schedule={"name": "linear", "min_lr": 0.01},
    )
    lrs: list[float] = []

    def record(optimizer, args, kwargs):
        lrs.append(optimizer.param_groups[0]["lr"])

    handle = register_optimizer_step_post_hook(record)
    try:
        result = fit_model(model, data, spec, "classification", "cross_entropy")
    finally:
        handle.remove()
    assert len(lrs) == 4 * 4  # 8 micro-batches per epoch, 2 per step
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[-1] > 0.01 + 1e-9  # still decaying on the last step...
    assert result.history[-1]["lr"] == pytest.approx(0.01)  # ...to min_lr after it
    assert all(a > b for a, b in itertools.pairwise(lrs))


def test_accumulation_through_kiln_fit(count_steps):
    spec = {
        "name": "iris",
        "task": "classification",
        "data": {"source": "sklearn:iris", "target": "target"},
        "model": {"type": "mlp", "hidden": [8]},
        "train": {
            "epochs": 3,
            "batch_size": 16,
            "gradient_accumulation": 2,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.05},
        },
    }
    bundle = kiln.fit(spec)
    n_train = bundle.meta.lineage.split.train
    assert len(count_steps) == 3 * math.ceil(math.ceil(n_train / 16) / 2)
    assert bundle.meta.lineage.spec["train"]["gradient_accumulation"] == 2


# ---- mixed precision ------------------------------------------------------------------------


def test_mixed_precision_auto_is_full_precision_on_cpu():
    data = class_data(32)
    auto = run(data, epochs=2, batch_size=8, mixed_precision="auto")
    off = run(data, epochs=2, batch_size=8, mixed_precision="off")
    for a, b in zip(auto.state_dict().values(), off.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_mixed_precision_bf16_autocasts_the_forward_pass():
    data = class_data(32)
    model = fresh_model(data, "classification")
    dtypes: set[torch.dtype] = set()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    first.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(data, model=model, epochs=2, batch_size=8, mixed_precision="bf16")
    assert torch.bfloat16 in dtypes
    after = model.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values())  # weights stay fp32
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
