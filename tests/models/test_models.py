"""Architectures from the registry: shapes, checks, initialisation, summaries."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kiln.errors import SpecError
from kiln.models import available, build, register
from kiln.models.summary import count_parameters, summarize
from kiln.spec import CNNSpec, LinearSpec, MLPSpec


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def biases(model: nn.Module) -> list[torch.Tensor]:
    return [m.bias for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def test_builtins_are_registered():
    assert {"linear", "mlp", "cnn"} <= set(available())


@pytest.mark.parametrize(
    ("spec", "n_in", "n_out"),
    [
        (LinearSpec(), 7, 3),
        (LinearSpec(), 4, 1),
        (MLPSpec(hidden=[8, 4], dropout=0.2, batch_norm=True), 5, 2),
        (CNNSpec(input_shape=[1, 8, 8], channels=[4, 6], hidden=[10]), 64, 10),
        (CNNSpec(input_shape=[3, 5, 4], channels=[2], pool=1, hidden=[]), 60, 4),
    ],
)
def test_output_shapes(spec, n_in, n_out):
    torch.manual_seed(0)
    model = build(spec, n_in, n_out).eval()
    out = model(torch.randn(6, n_in))
    assert out.shape == (6, n_out)


def test_cnn_reshapes_flat_pixels_and_pools():
    model = build(CNNSpec(input_shape=[1, 8, 8], channels=[4, 6], hidden=[10]), 64, 3)
    rows = summarize(model, 64)
    shapes = {r.kind: r.output_shape for r in rows if r.kind in ("Reshape", "Flatten")}
    assert shapes["Reshape"] == [1, 8, 8]
    assert shapes["Flatten"] == [6 * 2 * 2]  # two 2x2 pools: 8 -> 4 -> 2
    pools = [r.output_shape for r in rows if r.kind == "MaxPool2d"]
    assert pools == [[4, 4, 4], [6, 2, 2]]


def test_cnn_input_shape_mismatch_names_the_key():
    with pytest.raises(SpecError) as info:
        build(CNNSpec(input_shape=[1, 8, 8]), 63, 10)
    assert info.value.field == "model.input_shape"
    assert "model.input_shape" in info.value.message
    assert "64" in info.value.message and "63" in info.value.message


def test_mlp_layers_follow_the_spec():
    model = build(MLPSpec(hidden=[8, 4], activation="tanh", dropout=0.5, batch_norm=True), 3, 2)
    kinds = [type(m).__name__ for m in model]
    assert kinds == [
        "Linear",
        "BatchNorm1d",
        "Tanh",
        "Dropout",
        "Linear",
        "BatchNorm1d",
        "Tanh",
        "Dropout",
        "Linear",
    ]


def test_unknown_model_type_is_a_spec_error():
    with pytest.raises(SpecError) as info:
        build(SimpleNamespace(type="transformer9000"), 3, 2)
    assert info.value.field == "model.type"
    assert "transformer9000" in info.value.message


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register("mlp")(lambda spec, i, o: nn.Linear(i, o))


# ---- initialisation --------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        LinearSpec(init="zeros"),
        MLPSpec(hidden=[8], init="zeros"),
        CNNSpec(input_shape=[1, 4, 4], channels=[2], hidden=[3], init="zeros"),
    ],
)
def test_zeros_init_gives_all_zero_weights(spec):
    model = build(spec, 16, 3)
    assert all(torch.count_nonzero(w) == 0 for w in weights(model))
    assert all(torch.count_nonzero(b) == 0 for b in biases(model))


def test_normal_init_has_small_std():
    torch.manual_seed(0)
    model = build(MLPSpec(hidden=[256], init="normal"), 256, 256)
    w = weights(model)[0]
    assert w.std().item() == pytest.approx(0.02, rel=0.05)
    assert w.mean().item() == pytest.approx(0.0, abs=0.002)


def test_kaiming_init_scales_with_fan_in():
    torch.manual_seed(0)
    model = build(MLPSpec(hidden=[256], init="kaiming"), 400, 2)
    w = weights(model)[0]
    assert w.std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.05)
    assert all(torch.count_nonzero(b) == 0 for b in biases(model))


def test_xavier_init_for_relu_mlp_uses_relu_gain():
    torch.manual_seed(0)
    model = build(MLPSpec(hidden=[200], init="xavier"), 200, 2)
    bound = math.sqrt(2) * math.sqrt(6 / 400)
    w = weights(model)[0]
    assert w.abs().max().item() <= bound
    assert w.abs().max().item() > 0.95 * bound


def test_xavier_init_for_linear_model_uses_unit_gain():
    torch.manual_seed(0)
    model = build(LinearSpec(init="xavier"), 200, 200)
    bound = math.sqrt(6 / 400)  # gain 1 for a model with no activation
    w = weights(model)[0]
    assert w.abs().max().item() <= bound
    assert w.abs().max().item() > 0.95 * bound


def test_default_init_keeps_pytorch_init():
    torch.manual_seed(0)
    model = build(MLPSpec(hidden=[8], init="default"), 4, 2)
    # PyTorch's own init draws biases uniformly; kiln's schemes zero them.
    assert all(torch.count_nonzero(b) > 0 for b in biases(model))


def test_same_seed_same_init():
    torch.manual_seed(3)
    a = build(MLPSpec(hidden=[5]), 4, 2)
    torch.manual_seed(3)
    b = build(MLPSpec(hidden=[5]), 4, 2)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)


# ---- summary -----------------------------------------------------------------------


def test_summary_rows_and_parameter_counts():
    model = build(MLPSpec(hidden=[8, 4]), 5, 3)
    rows = summarize(model, 5)
    assert [r.kind for r in rows] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [r.output_shape for r in rows] == [[8], [8], [4], [4], [3]]
    assert [r.params for r in rows] == [5 * 8 + 8, 0, 8 * 4 + 4, 0, 4 * 3 + 3]
    assert sum(r.params for r in rows) == count_parameters(model) == 48 + 36 + 15
    assert all(r.trainable == r.params for r in rows)


def test_summary_counts_frozen_parameters_and_restores_mode():
    model = build(MLPSpec(hidden=[4], batch_norm=True), 3, 2)
    model[0].weight.requires_grad_(False)
    model.train()
    rows = summarize(model, 3)
    first = rows[0]
    assert (first.params, first.trainable) == (3 * 4 + 4, 4)
    assert [r.kind for r in rows][:2] == ["Linear", "BatchNorm1d"]
    assert rows[1].params == 8
    assert model.training  # summarize put the model back in train mode


def test_linear_summary():
    model = build(LinearSpec(), 13, 3)
    rows = summarize(model, 13)
    assert len(rows) == 1
    assert rows[0].params == count_parameters(model) == 13 * 3 + 3
