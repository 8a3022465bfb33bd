"""The compression building blocks on their own: the distillation loss, magnitude pruning
(masks, global, structured), int8 quantization (onnxruntime and torch) and layer
sensitivity, on tiny models made in the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the conventional name

from kiln.compress.distill import DistillLoss, check_student
from kiln.compress.prune import (
    Sparsity,
    prunable_layers,
    sparsity,
    structured,
    unstructured_masks,
)
from kiln.compress.quantize import ort_int8, quantizable_nodes, sensitivity
from kiln.compress.steps import STEP_CLASSES, Attempt, Distill, Prune, Quantize, step_for
from kiln.errors import SpecError
from kiln.models.registry import build
from kiln.runtime.onnx import OnnxBackend, export_onnx
from kiln.runtime.quantized import torch_int8
from kiln.spec.compress import CompressSpec, DistillSettings
from kiln.spec.model import LinearSpec, MLPSpec, TransformerSpec

# ---- distillation loss ---------------------------------------------------------------


def _hand_kd(student, teacher, labels, temperature, alpha):
    """Hinton et al. by hand: alpha * KL(p_teacher || p_student) * T² + (1 - alpha) * CE."""
    p_t = torch.softmax(teacher / temperature, dim=1)
    log_p_s = torch.log_softmax(student / temperature, dim=1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(dim=1).mean()
    ce = -torch.log_softmax(student, dim=1)[torch.arange(len(labels)), labels].mean()
    return alpha * kl * temperature**2 + (1 - alpha) * ce


@pytest.mark.parametrize(("temperature", "alpha"), [(4.0, 0.7), (1.0, 0.5), (2.5, 1.0), (3, 0.0)])
def test_classification_distill_loss_is_softened_kl_times_t_squared_plus_ce(temperature, alpha):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 3, generator=gen)
    teacher = torch.randn(6, 3, generator=gen) * 3
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    target = torch.cat([labels[:, None].float(), teacher], dim=1)  # (B, 1 + K)

    got = DistillLoss("classification", temperature, alpha)(student, target)

    expected = _hand_kd(student, teacher, labels, temperature, alpha)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_distill_loss_is_zero_soft_term_when_student_copies_teacher():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    target = torch.cat([torch.tensor([[0.0], [2.0]]), logits], dim=1)
    soft_only = DistillLoss("classification", 3.0, 1.0)(logits, target)
    assert float(soft_only) == pytest.approx(0.0, abs=1e-6)


def test_plain_labels_get_the_hard_cross_entropy_alone():
    student = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    labels = torch.tensor([1, 2])
    got = DistillLoss("classification", 4.0, 0.7)(student, labels)
    torch.testing.assert_close(got, F.cross_entropy(student, labels))


def test_regression_distill_loss_mixes_mse_to_teacher_and_to_labels():
    pred = torch.tensor([[1.0], [2.0], [-1.0]])  # (B, 1)
    y = torch.tensor([1.5, 1.0, 0.0])
    teacher = torch.tensor([0.0, 2.5, -2.0])
    loss = DistillLoss("regression", 4.0, 0.25)

    got = loss(pred, torch.stack([y, teacher], dim=1))  # (B, 2) [value, teacher value]

    p = pred.squeeze(-1)
    expected = 0.25 * ((p - teacher) ** 2).mean() + 0.75 * ((p - y) ** 2).mean()
    torch.testing.assert_close(got, expected)
    # Validation targets are plain values: the hard loss alone.
    torch.testing.assert_close(loss(pred, y), ((p - y) ** 2).mean())


def test_student_must_read_the_teachers_kind_of_input():
    tabular_student = DistillSettings.model_validate({"student": {"type": "mlp"}})
    text_student = DistillSettings.model_validate({"student": {"type": "transformer"}})
    check_student(tabular_student, "tabular", "mlp")  # fine
    check_student(text_student, "text", "transformer")  # fine
    with pytest.raises(SpecError, match="transformer student cannot learn") as err:
        check_student(text_student, "tabular", "mlp")
    assert err.value.field == "steps.distill.student"
    with pytest.raises(SpecError, match="mlp student"):
        check_student(tabular_student, "text", "transformer")


# ---- pruning --------------------------------------------------------------------------


def _mlp(hidden=(16, 8), n_inputs=6, n_outputs=3, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return build(MLPSpec(hidden=list(hidden)), n_inputs, n_outputs)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_prunable_layers_leave_the_output_layer_out():
    model = _mlp()
    linears = _linears(model)
    assert prunable_layers(model) == linears[:-1]


def test_unstructured_prunes_amount_of_each_hidden_layer_and_keeps_the_output_layer():
    model = _mlp()
    masked = unstructured_masks(model, 0.5, "unstructured")
    hidden = _linears(model)[:-1]
    assert masked == hidden
    for layer in hidden:
        assert int((layer.weight == 0).sum()) == round(0.5 * layer.weight.numel())
    assert int((_linears(model)[-1].weight == 0).sum()) == 0
    # It is the smallest weights that go.
    first = hidden[0]
    kept = first.weight_orig[first.weight_mask.bool()].abs().min()
    dropped = first.weight_orig[~first.weight_mask.bool()].abs().max()
    assert kept >= dropped


def test_masks_keep_pruned_weights_at_zero_through_training():
    model = _mlp()
    unstructured_masks(model, 0.6, "unstructured")
    zeros_before = [(m.weight == 0).clone() for m in _linears(model)[:-1]]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for module in _linears(model)[:-1]:
        torch.nn.utils.prune.remove(module, "weight")
    for module, zeros in zip(_linears(model)[:-1], zeros_before, strict=True):
        assert bool((module.weight[zeros] == 0).all())
        assert not hasattr(module, "weight_mask")  # folded in: a plain parameter again


def test_global_pruning_prunes_amount_of_all_hidden_weights_together():
    model = _mlp(hidden=(32, 4))
    # Make the first layer's weights much smaller: global pruning takes them first.
    with torch.no_grad():
        _linears(model)[0].weight.mul_(1e-6)
    unstructured_masks(model, 0.5, "global")
    hidden = _linears(model)[:-1]
    total = sum(m.weight.numel() for m in hidden)
    zeros = [int((m.weight == 0).sum()) for m in hidden]
    assert sum(zeros) == round(0.5 * total)
    assert zeros[1] == 0  # not per layer: the second layer kept all its (larger) weights
    assert zeros[0] == sum(zeros)


def test_sparsity_counts_parameters_and_nonzeros():
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(1.0)
    assert sparsity(layer) == Sparsity(parameters=10, nonzeros=2, sparsity=pytest.approx(0.8))


def test_structured_pruning_removes_neurons_and_reports_the_smaller_spec():
    spec = MLPSpec(hidden=[16, 8])
    model = _mlp()
    before = sum(p.numel() for p in model.parameters())
    pruned, new_spec = structured(model, spec, 0.5, torch.zeros(1, 6))
    assert new_spec.hidden == [8, 4]
    assert [m.out_features for m in _linears(pruned)] == [8, 4, 3]
    assert sum(p.numel() for p in pruned.parameters()) < before
    # The spec rebuilds exactly this architecture (what loading the bundle does).
    rebuilt = build(new_spec, 6, 3)
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    x = torch.randn(5, 6)
    torch.testing.assert_close(rebuilt.eval()(x), pruned.eval()(x))


@pytest.mark.parametrize("spec", [LinearSpec(), TransformerSpec()])
def test_structured_pruning_of_other_models_names_the_alternatives(spec):
    with pytest.raises(SpecError, match="use method: unstructured or global") as err:
        structured(nn.Linear(4, 3), spec, 0.5, torch.zeros(1, 4))
    assert err.value.field == "steps.prune.method"
    assert spec.type in err.value.message


# ---- quantization ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_graph() -> tuple[nn.Module, bytes, np.ndarray]:
    model = _mlp(hidden=(16, 8)).eval()
    graph = export_onnx(model, torch.zeros(1, 6))
    sample = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    return model, graph, sample


def test_quantizable_nodes_are_the_weight_matmuls(fp32_graph):
    _, graph, _ = fp32_graph
    nodes = quantizable_nodes(graph)
    assert len(nodes) == 3  # one per nn.Linear
    assert len(set(nodes)) == 3


def test_ort_int8_quantizes_the_weights_and_stays_close(fp32_graph):
    model, graph, sample = fp32_graph
    import onnx

    quantized = ort_int8(graph)
    ops = {n.op_type for n in onnx.load_from_string(quantized).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    int8_weights = [
        init
        for init in onnx.load_from_string(quantized).graph.initializer
        if init.data_type == onnx.TensorProto.INT8
    ]
    assert int8_weights
    out = OnnxBackend(quantized).forward(sample)
    ref = model(torch.from_numpy(sample)).detach().numpy()
    assert out.shape == ref.shape
    assert np.isfinite(out).all()
    # The int8 model ranks the classes like the fp32 one on most rows.
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.75


def test_ort_int8_leaves_excluded_nodes_in_fp32(fp32_graph):
    _, graph, sample = fp32_graph
    import onnx

    every = quantizable_nodes(graph)
    untouched = ort_int8(graph, exclude=every)
    ops = {n.op_type for n in onnx.load_from_string(untouched).graph.node}
    assert "MatMulInteger" not in ops
    np.testing.assert_allclose(
        OnnxBackend(untouched).forward(sample), OnnxBackend(graph).forward(sample), atol=1e-5
    )


def test_sensitivity_ranks_every_quantizable_node_once_most_sensitive_first(fp32_graph):
    _, graph, sample = fp32_graph
    ranking = sensitivity(graph, sample)
    assert sorted(name for name, _ in ranking) == sorted(quantizable_nodes(graph))
    scores = [score for _, score in ranking]
    assert all(s >= 0 and np.isfinite(s) for s in scores)
    assert scores == sorted(scores, reverse=True)


def test_sensitivity_measures_each_node_on_its_own(fp32_graph):
    _, graph, sample = fp32_graph
    scores = [score for _, score in sensitivity(graph, sample)]
    assert len(set(scores)) > 1


def test_torch_int8_swaps_linears_for_dynamic_quantized_ones():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    quantized = torch_int8(model)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, dynamic) for m in quantized.modules()) == 2
    assert isinstance(model[0], nn.Linear)  # the fp32 model is left as it was
    x = torch.randn(16, 6)
    torch.testing.assert_close(quantized(x), model(x), atol=0.1, rtol=0.05)


# ---- the step classes ------------------------------------------------------------------


def test_each_spec_step_gets_the_step_class_of_its_kind_and_starts_as_written():
    spec = CompressSpec.model_validate(
        {
            "source": "unused",
            "steps": [
                {"distill": {"student": {"type": "mlp", "hidden": [4]}}},
                {"prune": {"amount": 0.3}},
                {"quantize": {"backend": "onnxruntime"}},
            ],
        }
    )
    steps = [step_for(s) for s in spec.steps]
    assert [type(s) for s in steps] == [Distill, Prune, Quantize]
    assert [s.kind for s in steps] == ["distill", "prune", "quantize"]
    assert [s.first() for s in steps] == [Attempt(), Attempt(amount=0.3), Attempt()]
    assert set(STEP_CLASSES) == {type(s) for s in spec.steps}
