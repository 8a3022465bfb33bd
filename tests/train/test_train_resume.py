"""kiln.fit determinism and exact resume after an interruption."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import kiln
from kiln.errors import Interrupted, TrainingError
from kiln.train.callbacks import Callback
from kiln.workflow import checkpoint_dir

EPOCHS = 6


class InterruptAt(Callback):
    """Acts like Ctrl-C after epoch ``k`` has finished (and been checkpointed)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_epoch_end(self, logs: dict[str, Any]) -> None:
        if logs["epoch"] == self.k:
            raise KeyboardInterrupt


@pytest.fixture
def resume_spec(make_spec):
    # Dropout consumes the global RNG and the cosine schedule with warm-up has state, so
    # an exact resume needs both restored, as well as the shuffle generator and optimizer.
    return make_spec(
        model={"type": "mlp", "hidden": [16], "dropout": 0.3},
        train={
            "epochs": EPOCHS,
            "batch_size": 16,
            "optimizer": {"name": "adam", "lr": 0.01},
            "lr_schedule": {"name": "cosine", "warmup": 0.2},
            "early_stopping": {"patience": 50, "metric": "val_loss"},
        },
    )


def state(bundle) -> dict[str, torch.Tensor]:
    return bundle.model.state_dict()


def identical(a, b) -> bool:
    sa, sb = state(a), state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def history(bundle) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in epoch.items() if k != "seconds"} for epoch in bundle.meta.training.history
    ]


@pytest.fixture
def reference(resume_spec, tmp_path):
    return kiln.fit(resume_spec, out=tmp_path / "reference")


def interrupt(spec, out, k: int = 3) -> None:
    with pytest.raises(Interrupted) as info:
        kiln.fit(spec, out=out, callbacks=[InterruptAt(k)])
    assert f"after epoch {k}" in info.value.message


def test_same_spec_same_weights(resume_spec, reference):
    again = kiln.fit(resume_spec)
    assert identical(reference, again)
    assert history(reference) == history(again)
    other = kiln.fit({**resume_spec, "train": {**resume_spec["train"], "seed": 1}})
    assert not identical(reference, other)


def test_resume_is_bit_identical_to_an_uninterrupted_run(resume_spec, reference, tmp_path):
    out = tmp_path / "model"
    interrupt(resume_spec, out)
    assert not out.exists()  # no half bundle
    assert (checkpoint_dir(out) / "last.pt").is_file()

    resumed = kiln.fit(resume_spec, out=out, resume=True)

    assert resumed.meta.training.resumed_from_epoch == 3
    assert resumed.meta.training.epochs_run == EPOCHS
    assert history(resumed) == history(reference)
    assert [e["lr"] for e in history(resumed)] == [e["lr"] for e in history(reference)]
    assert identical(resumed, reference)
    assert resumed.metrics == reference.metrics
    assert resumed.meta.training.best_epoch == reference.meta.training.best_epoch
    # The saved bundle holds the resumed weights, and the checkpoint is gone.
    loaded = kiln.load(str(out))
    assert identical(loaded, reference)
    assert not checkpoint_dir(out).exists()


def test_a_checkpoint_holds_what_its_type_names(resume_spec, tmp_path):
    """The saved state is a ``CheckpointState``: its keys, and its tensors where it
    names them, so the type says what a resume reads."""
    from kiln.train.checkpoint import CheckpointState, DirCheckpoints

    out = tmp_path / "model"
    interrupt(resume_spec, out)
    saved = DirCheckpoints(checkpoint_dir(out)).load()
    assert saved is not None
    keys = CheckpointState.__required_keys__ | CheckpointState.__optional_keys__
    assert set(saved) == keys
    assert saved["epoch"] == 3 and [e["epoch"] for e in saved["history"]] == [1, 2, 3]
    assert isinstance(saved["run_id"], str) and saved["stopped_early"] is False
    assert all(isinstance(v, torch.Tensor) for v in saved["model"].values())
    assert isinstance(saved["shuffle_rng"], torch.Tensor)
    assert isinstance(saved["torch_rng"], torch.Tensor) and saved["cuda_rng"] == []


@pytest.mark.parametrize(
    ("target", "attr"),
    [
        (torch, "set_rng_state"),
        (torch.optim.lr_scheduler.SequentialLR, "load_state_dict"),
    ],
    ids=["rng-not-restored", "schedule-not-restored"],
)
def test_resume_check_is_sensitive_to_what_it_restores(
    resume_spec, reference, tmp_path, monkeypatch, target, attr
):
    # Negative control: break one restore step and the resumed run must differ, which
    # shows the spec above really exercises RNG and scheduler restoration.
    out = tmp_path / "model"
    interrupt(resume_spec, out)
    monkeypatch.setattr(target, attr, lambda *args, **kwargs: None)
    resumed = kiln.fit(resume_spec, out=out, resume=True)
    assert not identical(resumed, reference)


def test_resume_with_a_changed_spec_errors(resume_spec, tmp_path):
    out = tmp_path / "model"
    interrupt(resume_spec, out, k=2)
    changed = {**resume_spec, "train": {**resume_spec["train"], "epochs": EPOCHS + 1}}
    with pytest.raises(TrainingError) as info:
        kiln.fit(changed, out=out, resume=True)
    assert info.value.field == "resume"
    assert "different spec or data" in info.value.message
    assert (checkpoint_dir(out) / "last.pt").is_file()  # kept for the right spec


def test_resume_with_changed_data_errors(make_spec, frame, write_table, tmp_path):
    path = write_table(frame, "data.csv")
    spec = make_spec(data={"source": path, "target": "label"}, train={"epochs": 4})
    out = tmp_path / "model"
    interrupt(spec, out, k=2)
    write_table(frame.assign(x2=frame["x2"] + 1), "data.csv")
    with pytest.raises(TrainingError, match="different spec or data"):
        kiln.fit(spec, out=out, resume=True)


def test_resume_without_a_checkpoint_errors(resume_spec, tmp_path):
    with pytest.raises(TrainingError, match="nothing to resume"):
        kiln.fit(resume_spec, out=tmp_path / "fresh", resume=True)


def test_explicit_checkpoint_directory(resume_spec, reference, tmp_path):
    ckpt = tmp_path / "ckpts"
    with pytest.raises(Interrupted):
        kiln.fit(resume_spec, checkpoints=ckpt, callbacks=[InterruptAt(4)])
    assert (ckpt / "last.pt").is_file()
    resumed = kiln.fit(resume_spec, checkpoints=ckpt, resume=True)
    assert resumed.meta.training.resumed_from_epoch == 4
    assert identical(resumed, reference)


def test_resume_after_the_epoch_that_stopped_early(make_spec, tmp_path):
    # min_delta this large means only epoch 1 counts as an improvement: with patience 2
    # the run stops after epoch 3.
    spec = make_spec(
        train={
            "epochs": 10,
            "early_stopping": {"patience": 2, "metric": "train_loss", "min_delta": 1e6},
        }
    )
    reference = kiln.fit(spec)
    assert reference.meta.training.epochs_run == 3
    out = tmp_path / "model"
    interrupt(spec, out, k=3)  # Ctrl-C lands during the last epoch's callbacks
    resumed = kiln.fit(spec, out=out, resume=True)
    assert resumed.meta.training.epochs_run == 3
    assert history(resumed) == history(reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_is_bit_identical(resume_spec, tmp_path):
    spec = {**resume_spec, "train": {**resume_spec["train"], "device": "cuda"}}
    reference = kiln.fit(spec)
    if not identical(reference, kiln.fit(spec)):
        pytest.skip("CUDA kernels are not deterministic on this machine")
    out = tmp_path / "model"
    interrupt(spec, out)
    resumed = kiln.fit(spec, out=out, resume=True)
    assert identical(resumed, reference)
