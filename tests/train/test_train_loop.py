"""The training engine on in-memory tensors: optimizers, losses, batching, penalties,
clipping, schedules, early stopping, callbacks, divergence and determinism."""

from __future__ import annotations

import io
import itertools
import json
import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from kiln.errors import Interrupted, TrainingError
from kiln.models import build
from kiln.spec import LinearSpec, MLPSpec, TrainSpec
from kiln.train.callbacks import Callback, JsonlLog, RichProgress
from kiln.train.checkpoint import DirCheckpoints
from kiln.train.loop import TensorData, fit_model
from kiln.train.losses import make_loss


def class_data(n: int = 96, features: int = 4, classes: int = 3, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    y = (x @ w).argmax(dim=1)
    return TensorData(x, y, x[: n // 4].clone(), y[: n // 4].clone())


def reg_data(n: int = 96, features: int = 4, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = x @ torch.tensor([1.5, -2.0, 0.5, 0.0])[:features] + 0.1 * torch.randn(n, generator=g)
    return TensorData(x, y.float(), x[: n // 4].clone(), y[: n // 4].float().clone())


def model_for(data: TensorData, task: str, spec: Any = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    n_out = int(data.y_train.max()) + 1 if task == "classification" else 1
    return build(spec or LinearSpec(), data.x_train.shape[1], n_out)


def loss_on(model: nn.Module, data: TensorData, loss: str) -> float:
    model.eval()
    with torch.no_grad():
        return float(make_loss(loss)(model(data.x_train), data.y_train))


def train(task="classification", loss="cross_entropy", data=None, model=None, **spec_kw):
    data = data or (class_data() if task == "classification" else reg_data())
    model = model or model_for(data, task)
    callbacks = spec_kw.pop("callbacks", ())
    result = fit_model(
        model, data, TrainSpec(**{"device": "cpu", **spec_kw}), task, loss, callbacks=callbacks
    )
    return model, result


class Snapshots(Callback):
    """Records the model's weights after every epoch (reads only)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.events: list[str] = []

    def on_train_start(self, epochs: int, start_epoch: int) -> None:
        self.events.append(f"start {epochs} {start_epoch}")

    def on_epoch_end(self, logs: dict[str, Any]) -> None:
        self.states[logs["epoch"]] = {
            k: v.detach().clone() for k, v in self.model.state_dict().items()
        }
        self.events.append(f"epoch {logs['epoch']}")

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self.events.append("end")


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- optimizers and losses ----------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "sgd", "lr": 0.1},
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"name": "adam", "lr": 0.05},
        {"name": "adamw", "lr": 0.05, "weight_decay": 0.01, "betas": [0.8, 0.95]},
        {"name": "adagrad", "lr": 0.1},
        {"name": "rmsprop", "lr": 0.01, "momentum": 0.5},
    ],
)
def test_each_optimizer_lowers_training_loss(optimizer):
    data = class_data()
    model = model_for(data, "classification", MLPSpec(hidden=[8]))
    before = loss_on(model, data, "cross_entropy")
    _, result = train(data=data, model=model, epochs=8, optimizer=optimizer)
    after = loss_on(model, data, "cross_entropy")
    assert after < 0.8 * before
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


@pytest.mark.parametrize(
    ("task", "loss"),
    [
        ("classification", "cross_entropy"),
        ("classification", "hinge"),
        ("regression", "mse"),
        ("regression", "mae"),
        ("regression", "huber"),
    ],
)
def test_each_loss_trains(task, loss):
    data = class_data() if task == "classification" else reg_data()
    model = model_for(data, task)
    before = loss_on(model, data, loss)
    _, result = train(task, loss, data=data, model=model, epochs=10, optimizer={"lr": 0.05})
    assert loss_on(model, data, loss) < 0.7 * before
    assert len(result.history) == 10
    if task == "regression":
        assert {"val_mse", "val_rmse", "val_mae", "val_r2"} <= set(result.history[-1])
    else:
        assert "val_accuracy" in result.history[-1]


def test_regression_val_metrics_are_in_target_units():
    data = reg_data()
    model = model_for(data, "regression")
    result = fit_model(
        model, data, TrainSpec(epochs=2, device="cpu"), "regression", "mse", target_scale=10.0
    )
    logs = result.history[-1]
    # val_loss is on the encoded scale; val_mse is that error times scale**2.
    assert logs["val_mse"] == pytest.approx(logs["val_loss"] * 100.0, rel=1e-4)
    assert logs["val_rmse"] == pytest.approx(logs["val_mse"] ** 0.5)


# ---- batching -------------------------------------------------------------------------


@pytest.fixture
def count_steps():
    steps = []
    handle = register_optimizer_step_post_hook(lambda *args: steps.append(1))
    yield steps
    handle.remove()


@pytest.mark.parametrize(("batch_size", "steps_per_epoch"), [("full", 1), (1, 40), (16, 3)])
def test_batch_size_sets_steps_per_epoch(count_steps, batch_size, steps_per_epoch):
    data = class_data(n=40)
    model = model_for(data, "classification")
    before = loss_on(model, data, "cross_entropy")
    train(data=data, model=model, epochs=3, batch_size=batch_size, optimizer={"lr": 0.05})
    assert len(count_steps) == 3 * steps_per_epoch
    assert loss_on(model, data, "cross_entropy") < before


def test_batch_norm_with_batch_size_one_skips_single_rows(count_steps):
    data = class_data(n=9)
    model = model_for(data, "classification", MLPSpec(hidden=[4], batch_norm=True))
    _, result = train(data=data, model=model, epochs=2, batch_size=4)
    # 9 rows in batches of 4: the last batch of one row cannot be normalised.
    assert len(count_steps) == 2 * 2
    assert result.epochs_run == 2


# ---- regularization and clipping ------------------------------------------------------


def test_l1_shrinks_weights():
    data = class_data(features=8)
    kw = {"epochs": 15, "optimizer": {"name": "adam", "lr": 0.05}}
    plain, _ = train(data=data, model=model_for(data, "classification"), **kw)
    sparse, _ = train(
        data=data,
        model=model_for(data, "classification"),
        regularization={"l1": 0.05},
        **kw,
    )
    w_plain, w_l1 = plain[0].weight.abs(), sparse[0].weight.abs()
    assert w_l1.sum() < 0.7 * w_plain.sum()
    assert (w_l1 < 1e-2).sum() > (w_plain < 1e-2).sum()


def test_l2_shrinks_weights_and_biases_are_not_penalised():
    data = class_data()
    kw = {"epochs": 10, "optimizer": {"name": "sgd", "lr": 0.1}}
    plain, _ = train(data=data, model=model_for(data, "classification"), **kw)
    l2, _ = train(
        data=data, model=model_for(data, "classification"), regularization={"l2": 0.5}, **kw
    )
    assert l2[0].weight.norm() < 0.7 * plain[0].weight.norm()


def test_grad_clip_bounds_the_update():
    data = class_data()
    kw = {"epochs": 1, "batch_size": "full", "optimizer": {"name": "sgd", "lr": 1.0}}

    def update_norm(**extra):
        model = model_for(data, "classification")
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train(data=data, model=model, **kw, **extra)
        end = torch.cat([p.detach().flatten() for p in model.parameters()])
        return float((end - start).norm())

    free = update_norm()
    clipped = update_norm(grad_clip=1e-3)
    assert clipped == pytest.approx(1e-3, rel=1e-3)  # one SGD step of lr * clipped grad
    assert free > 10 * clipped


# ---- learning-rate schedules ---------------------------------------------------------


def lrs(**schedule) -> list[float]:
    epochs = schedule.pop("epochs", 6)
    lr = schedule.pop("lr", 0.1)
    _, result = train(
        epochs=epochs,
        batch_size="full",
        optimizer={"name": "sgd", "lr": lr},
        lr_schedule=schedule,
    )
    return [h["lr"] for h in result.history]


def test_no_schedule_keeps_lr():
    assert lrs(name="none") == [0.1] * 6


def test_step_schedule_decays_every_n_epochs():
    got = lrs(name="step", step_epochs=2, gamma=0.5)
    assert got == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])


def test_cosine_schedule_anneals_to_min_lr():
    got = lrs(name="cosine", min_lr=0.01, epochs=5)
    # One step per epoch: lr after step e is min + (base - min) * (1 + cos(pi * e / 5)) / 2.
    want = [0.01 + 0.09 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(1, 6)]
    assert got == pytest.approx(want, rel=1e-6)
    assert got[-1] == pytest.approx(0.01)


def test_linear_schedule_decays_linearly():
    got = lrs(name="linear", min_lr=0.01, epochs=5)
    assert got == pytest.approx([0.082, 0.064, 0.046, 0.028, 0.01])


def test_warmup_ramps_up_then_follows_schedule():
    got = lrs(name="cosine", warmup=0.5, epochs=8)
    peak = got.index(max(got))
    assert got[0] < 0.05
    assert all(a < b for a, b in itertools.pairwise(got[: peak + 1]))
    assert max(got) == pytest.approx(0.1)
    assert got[-1] == pytest.approx(0.0, abs=1e-9)


def test_plateau_reduces_lr_only_when_the_metric_stalls():
    # With a tiny lr val_loss barely moves: every epoch after the first is a plateau.
    stalled = lrs(name="plateau", patience=0, factor=0.5, lr=1e-6)
    assert stalled == pytest.approx([1e-6, 1e-6, 5e-7, 2.5e-7, 1.25e-7, 6.25e-8])
    improving = lrs(name="plateau", patience=0, factor=0.5, lr=0.5)
    assert improving == [0.5] * 6


# ---- early stopping ---------------------------------------------------------------------


def flipped_val_data() -> TensorData:
    """Validation labels are the training labels flipped: learning makes val_loss worse."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorData(x, y, x.clone(), 1 - y)


@pytest.mark.parametrize("metric", ["val_loss", "val_accuracy"])
def test_early_stopping_stops_and_restores_the_best_weights(metric):
    data = flipped_val_data()
    model = model_for(data, "classification")
    snaps = Snapshots(model)
    _, result = train(
        data=data,
        model=model,
        epochs=30,
        optimizer={"lr": 0.05},
        early_stopping={"patience": 3, "metric": metric},
        callbacks=[snaps],
    )
    assert result.stopped_early
    assert result.epochs_run < 30
    assert result.epochs_run == result.best_epoch + 3
    values = [h[metric] for h in result.history]
    best = min(values) if metric == "val_loss" else max(values)
    assert values[result.best_epoch - 1] == best
    assert same_weights(model.state_dict(), snaps.states[result.best_epoch])
    assert not same_weights(model.state_dict(), snaps.states[result.epochs_run])


def test_early_stopping_without_restore_keeps_last_weights():
    data = flipped_val_data()
    model = model_for(data, "classification")
    snaps = Snapshots(model)
    _, result = train(
        data=data,
        model=model,
        epochs=30,
        optimizer={"lr": 0.05},
        early_stopping={"patience": 2, "restore_best": False},
        callbacks=[snaps],
    )
    assert result.stopped_early
    assert same_weights(model.state_dict(), snaps.states[result.epochs_run])


def test_min_delta_counts_small_gains_as_no_improvement():
    _, result = train(
        epochs=20,
        optimizer={"lr": 0.05},
        early_stopping={"patience": 2, "metric": "train_loss", "min_delta": 1e6},
    )
    assert (result.best_epoch, result.epochs_run, result.stopped_early) == (1, 3, True)


def test_no_early_stop_when_improving():
    _, result = train(
        epochs=5, optimizer={"lr": 0.05}, early_stopping={"patience": 2, "metric": "train_loss"}
    )
    assert result.epochs_run == 5
    assert not result.stopped_early
    assert result.best_epoch == 5


def test_early_stopping_on_a_full_metric_logs_it():
    _, result = train(epochs=2, early_stopping={"patience": 5, "metric": "val_f1_macro"})
    assert all(0.0 <= h["val_f1_macro"] <= 1.0 for h in result.history)


# ---- callbacks, interruption, divergence ---------------------------------------------


def test_callbacks_see_every_epoch_in_order():
    data = class_data()
    model = model_for(data, "classification")
    snaps = Snapshots(model)
    train(data=data, model=model, epochs=3, callbacks=[snaps])
    assert snaps.events == ["start 3 0", "epoch 1", "epoch 2", "epoch 3", "end"]


def test_batch_hook_runs_per_batch_and_raising_there_stops_mid_epoch(tmp_path):
    class CancelAfter(Snapshots):
        """A cancelled job: counts batches and raises on the ``limit``-th one."""

        def __init__(self, model: nn.Module, limit: int) -> None:
            super().__init__(model)
            self.limit, self.batches = limit, 0

        def on_batch_end(self) -> None:
            self.batches += 1
            if self.batches == self.limit:
                raise RuntimeError("cancelled")

    data = class_data()  # 96 rows, batch 32: 3 batches an epoch
    model = model_for(data, "classification")
    counter = CancelAfter(model, limit=10**6)
    train(data=data, model=model, epochs=2, batch_size=32, callbacks=[counter])
    assert counter.batches == 6

    store = DirCheckpoints(tmp_path / "ckpt")
    cancel, log = CancelAfter(model, limit=5), tmp_path / "log.jsonl"
    with pytest.raises(RuntimeError, match="cancelled"):
        fit_model(
            model,
            data,
            TrainSpec(epochs=3, batch_size=32, device="cpu"),
            "classification",
            "cross_entropy",
            callbacks=[cancel, JsonlLog(log)],
            checkpoints=store,
        )
    assert cancel.events == ["start 3 0", "epoch 1", "end"]
    last = json.loads(log.read_text().splitlines()[-1])
    assert last == {"event": "end", "error": "cancelled", "epochs_run": 1}
    assert store.load()["epoch"] == 1  # the cancelled epoch left no checkpoint


def test_jsonl_log_writes_one_line_per_epoch(tmp_path):
    path = tmp_path / "log.jsonl"
    train(epochs=4, callbacks=[JsonlLog(path)])
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "epoch", "epoch", "epoch", "epoch", "end"]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    assert all(
        {"train_loss", "lr", "val_loss", "val_accuracy", "seconds"} <= set(e) for e in epochs
    )
    assert events[-1]["epochs_run"] == 4


def test_keyboard_interrupt_becomes_interrupted(tmp_path):
    class StopAt2(Callback):
        def on_epoch_end(self, logs: dict[str, Any]) -> None:
            if logs["epoch"] == 2:
                raise KeyboardInterrupt

    log = tmp_path / "log.jsonl"
    store = DirCheckpoints(tmp_path / "ckpt")
    data = class_data()
    with pytest.raises(Interrupted, match="after epoch 2"):
        fit_model(
            model_for(data, "classification"),
            data,
            TrainSpec(epochs=5, device="cpu"),
            "classification",
            "cross_entropy",
            callbacks=[JsonlLog(log), StopAt2()],
            checkpoints=store,
        )
    last = json.loads(log.read_text().splitlines()[-1])
    assert last == {"event": "end", "interrupted": True, "epochs_run": 2}
    assert store.load()["epoch"] == 2


def test_diverging_training_raises_training_error():
    data = reg_data()
    with pytest.raises(TrainingError) as info:
        train(
            "regression",
            "mse",
            data=data,
            epochs=50,
            batch_size="full",
            optimizer={"name": "sgd", "lr": 1e6},
        )
    assert "diverged" in info.value.message
    assert info.value.field == "train.optimizer.lr"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_asking_for_cuda_without_one_is_an_error():
    with pytest.raises(TrainingError) as info:
        train(epochs=1, device="cuda")
    assert info.value.field == "train.device"


# ---- determinism and checkpoints --------------------------------------------------------


def test_same_seed_same_weights_other_seed_differs():
    data = class_data()
    spec = {"epochs": 3, "batch_size": 8, "seed": 5}

    def run(seed_offset: int) -> dict[str, torch.Tensor]:
        model = model_for(data, "classification", MLPSpec(hidden=[8], dropout=0.5))
        train(data=data, model=model, **{**spec, "seed": spec["seed"] + seed_offset})
        return model.state_dict()

    assert same_weights(run(0), run(0))
    assert not same_weights(run(0), run(1))


def test_resume_needs_a_checkpoint_of_the_same_run(tmp_path):
    data = class_data()
    store = DirCheckpoints(tmp_path / "ckpt")

    def go(resume: bool, run_id: str):
        return fit_model(
            model_for(data, "classification"),
            data,
            TrainSpec(epochs=2, device="cpu"),
            "classification",
            "cross_entropy",
            checkpoints=store,
            resume=resume,
            run_id=run_id,
        )

    with pytest.raises(TrainingError, match="nothing to resume"):
        go(True, "a")
    go(False, "a")
    assert (tmp_path / "ckpt" / "last.pt").is_file()
    with pytest.raises(TrainingError, match="different spec or data"):
        go(True, "b")
    resumed = go(True, "a")  # already finished: nothing left to run
    assert resumed.resumed_from == 2
    assert resumed.epochs_run == 2
    store.clear()
    assert not (tmp_path / "ckpt").exists()


def test_corrupt_checkpoint_is_a_training_error(tmp_path):
    store = DirCheckpoints(tmp_path)
    store.path.write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="cannot be read"):
        store.load()


@pytest.mark.parametrize("where", ["dir", "artifacts"])
def test_checkpoint_round_trip_keeps_types_and_unpickles_nothing(tmp_path, monkeypatch, where):
    import pickle

    import numpy as np
    from safetensors import safe_open

    from kiln.jobs.checkpoints import ArtifactCheckpoints
    from kiln.store.artifacts import open_store

    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tied = torch.randn(2, 2)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "best_value": float("inf"),
        "history": [{"epoch": 1, "loss": 0.5}],
        "pair": (1, "a"),
        "nothing": None,
        "mask": torch.tensor([True, False]),
        "a": tied,
        "b": tied,  # one storage twice, as tied weights are
        "step": np.int64(3),
    }
    if where == "dir":
        store: Any = DirCheckpoints(tmp_path)
        store.save(state)
        with safe_open(str(store.path), framework="pt") as f:  # a plain safetensors file
            assert len(list(f.keys())) > 5
    else:
        store = ArtifactCheckpoints(open_store(str(tmp_path / "artifacts")), "jobs/j/checkpoint.pt")
        store.save(state)

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a checkpoint was unpickled")

    for module, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    back = store.load()

    assert list(back["optimizer"]["state"]) == [0, 1]  # int keys stay ints
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    restored = torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=0.01)
    restored.load_state_dict(back["optimizer"])
    for key, value in model.state_dict().items():
        assert torch.equal(back["model"][key], value)
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert torch.equal(back["torch_rng"], state["torch_rng"])
    assert back["best_value"] == math.inf and back["history"] == state["history"]
    assert back["pair"] == (1, "a") and back["nothing"] is None and back["step"] == 3
    assert back["mask"].dtype == torch.bool and back["mask"].tolist() == [True, False]
    assert torch.equal(back["a"], tied) and torch.equal(back["b"], tied)


def test_a_checkpoint_cannot_hold_arbitrary_objects(tmp_path):
    with pytest.raises(TrainingError, match="cannot hold 'object' values"):
        DirCheckpoints(tmp_path).save({"thing": object()})


def test_jsonl_log_to_an_open_stream_leaves_it_open():
    stream = io.StringIO()
    train(epochs=2, callbacks=[JsonlLog(stream)])
    assert not stream.closed
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["start", "epoch", "epoch", "end"]


def test_rich_progress_runs_and_stops(capsys):
    progress = RichProgress(metric="val_accuracy")
    _, result = train(epochs=3, callbacks=[progress])
    assert result.epochs_run == 3
    assert progress._progress is None  # stopped at the end of training
    assert "training" in capsys.readouterr().err


def test_callbacks_hear_the_end_of_a_failed_run(tmp_path):
    path = tmp_path / "log.jsonl"
    with pytest.raises(TrainingError):
        train(
            "regression",
            "mse",
            epochs=50,
            batch_size="full",
            optimizer={"name": "sgd", "lr": 1e6},
            callbacks=[JsonlLog(path)],
        )
    assert json.loads(path.read_text().splitlines()[-1])["event"] == "end"
