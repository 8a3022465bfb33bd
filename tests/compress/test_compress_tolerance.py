"""The accuracy tolerance: a step that loses too much backs off (pruning halves its amount,
onnxruntime int8 leaves one more sensitive layer in fp32) and retries; a step that cannot
fit raises ToleranceError and keeps the variants before it. Every attempt is recorded:
in the report of the variant that fit, and on the error of the step that did not."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import kiln
from kiln.compress.pipeline import CompressToleranceError
from kiln.compress.quantize import quantizable_nodes
from kiln.errors import SpecError, ToleranceError
from kiln.runtime.onnx import export_onnx


def _meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "kiln.json").read_text())


def _hidden_weights(directory: Path) -> list[torch.Tensor]:
    """The hidden layers' weight matrices (every nn.Linear but the output layer)."""
    state = load_file(str(directory / "weights.safetensors"))
    return [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2][:-1]


# ---- accuracy-aware back-off ---------------------------------------------------------


@pytest.fixture(scope="module")
def tolerance_failure(iris_mlp, run_compress, tmp_path_factory):
    """Step 1 (90% pruned, no fine-tuning) must back off to fit max_drop 0; step 2 wrecks
    the model whatever the amount (fine-tuning at lr 50), so it cannot fit."""
    out = tmp_path_factory.mktemp("tolerance") / "variants"
    spec = {
        "source": str(iris_mlp),
        "steps": [
            {"prune": {"method": "unstructured", "amount": 0.9, "finetune_epochs": 0}},
            {"prune": {"method": "unstructured", "amount": 0.9, "finetune_epochs": 1, "lr": 50}},
        ],
        "tolerance": {"metric": "accuracy", "max_drop": 0.0, "retries": 3},
    }
    events: list[str] = []
    with pytest.raises(CompressToleranceError) as err:
        run_compress(spec, out, on_event=events.append)
    return out, err.value, events


def test_impossible_tolerance_raises_naming_the_attempts(tolerance_failure):
    _, error, events = tolerance_failure
    assert isinstance(error, ToleranceError)
    assert error.code == "tolerance_not_met"
    assert "prune could not keep held-out accuracy within 0.0" in error.message
    assert "after 4 attempt(s)" in error.message
    assert "variants before this step are kept" in error.message
    assert error.field == "tolerance.max_drop"
    assert error.exit_code == 9
    assert error.http_status == 422
    assert sum("prune attempt" in e for e in events[-4:]) == 4
    assert all(f"{a.value:.4f}" in error.message for a in error.attempts)


def test_back_off_halves_the_amount_on_each_retry(tolerance_failure):
    out, error, events = tolerance_failure
    first = kiln.load(str(out / "01-prune")).report["attempts"]
    n = len(first)
    assert n >= 2  # 90% without fine-tuning loses accuracy: it had to back off
    assert [a["amount"] for a in first] == [0.9 / 2**i for i in range(n)]
    # The failing step: all retries used, each at half the amount of the one before.
    assert [a.attempt.number for a in error.attempts] == [1, 2, 3, 4]
    assert [a.attempt.amount for a in error.attempts] == [0.9, 0.45, 0.225, 0.1125]
    assert all(a.drop > 0 for a in error.attempts)
    prune_events = [e for e in events if e.startswith("prune attempt")]
    assert len(prune_events) == n + 4


def test_back_off_is_recorded_in_the_report_of_the_step_that_fit(tolerance_failure):
    out, _, _ = tolerance_failure
    bundle = kiln.load(str(out / "01-prune"))
    attempts = bundle.report["attempts"]
    assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
    assert [a["amount"] for a in attempts] == [0.9 / 2**i for i in range(len(attempts))]
    assert all(a["drop"] > 0 for a in attempts[:-1])
    assert attempts[-1]["drop"] <= 0
    # The saved variant is the one that fit, with the amount it fitted at.
    assert bundle.report["step"]["settings"]["amount"] == attempts[-1]["amount"]
    hidden = _hidden_weights(out / "01-prune")
    zeros = sum(int((w == 0).sum()) for w in hidden)
    assert zeros == sum(round(attempts[-1]["amount"] * w.numel()) for w in hidden)


def test_variants_before_the_failing_step_stay_and_nothing_half_written(tolerance_failure):
    out, error, _ = tolerance_failure
    assert [p.name for p in out.iterdir()] == ["01-prune"]  # no 02-prune, no temp dirs
    assert kiln.load(str(out / "01-prune")).report is not None
    # The error carries what fitted, reports included, for the caller to keep.
    assert [v.name for v in error.partial.variants] == ["01-prune"]
    assert error.partial.variants[0].path == out / "01-prune"
    assert error.partial.variants[0].report == kiln.load(str(out / "01-prune")).report
    assert error.partial.source.report["name"] == "iris-mlp"


# ---- onnxruntime back-off: one more sensitive layer left in fp32 per retry -------------

# Large enough that int8 (per-channel, 7 or 8 bits) rounds every other weight of a row to 0.
HUGE = 1000.0


@pytest.fixture(scope="module")
def fragile_mlp(iris_mlp, tmp_path_factory) -> tuple[Path, list[str]]:
    """A copy of the iris MLP whose last two layers int8 cannot represent, and the names
    of those two graph nodes.

    Hidden unit 0 of each hidden layer is made constant (weights 0, bias 1: 1 after the
    ReLU); every row of the next layer gets a huge weight on it, cancelled by its bias.
    In fp32 that is the same model less two units; quantized, the huge weight sets each
    row's scale and the row's other weights round to zero: the outputs go constant. Only
    leaving *both* layers in fp32 keeps the accuracy.
    """
    bundle = kiln.load(str(iris_mlp))
    linears = [m for m in bundle.model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    with torch.no_grad():
        for before, layer in itertools.pairwise(linears):
            before.weight[0].zero_()
            before.bias[0] = 1.0
            layer.weight[:, 0] = HUGE
            layer.bias -= HUGE
    out = tmp_path_factory.mktemp("fragile") / "source"
    bundle.save(out)
    nodes = quantizable_nodes(export_onnx(bundle.model, bundle.example_input()))
    assert len(nodes) == 3  # one per Linear layer, in order
    return out, nodes[1:]


def _quantize_spec(source: Path, retries: int) -> dict[str, Any]:
    return {
        "source": str(source),
        "steps": [{"quantize": {"backend": "onnxruntime"}}],
        "tolerance": {"max_drop": 0.2, "retries": retries},
    }


def test_onnxruntime_back_off_excludes_the_most_sensitive_layers_one_more_per_retry(
    fragile_mlp, run_compress, tmp_path
):
    source, fragile = fragile_mlp
    with pytest.raises(
        CompressToleranceError, match=r"quantize could not .* after 2 attempt\(s\)"
    ) as err:
        run_compress(_quantize_spec(source, retries=1), tmp_path / "out")
    attempts = err.value.attempts
    assert [a.attempt.number for a in attempts] == [1, 2]
    assert attempts[0].attempt.excluded == ()  # everything int8 first
    # then the most sensitive layer, one of the two fragile ones, in fp32: not enough
    assert len(attempts[1].attempt.excluded) == 1
    assert attempts[1].attempt.excluded[0] in fragile
    assert all(a.drop > 0.2 for a in attempts)
    assert not (tmp_path / "out" / "01-quantize").exists()
    assert err.value.partial.variants == []


@pytest.fixture(scope="module")
def backed_off_quantize(fragile_mlp, run_compress, tmp_path_factory):
    """The fragile MLP quantized with enough retries: it fits at the third attempt."""
    source, fragile = fragile_mlp
    out = tmp_path_factory.mktemp("backed-off") / "out"
    return run_compress(_quantize_spec(source, retries=3), out).variants[0], fragile


def test_onnxruntime_back_off_is_recorded_in_the_variant(backed_off_quantize):
    variant, fragile = backed_off_quantize
    report = variant.report
    attempts = report["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert "excluded" not in attempts[0]
    assert attempts[1]["excluded"] == attempts[2]["excluded"][:1]  # one more per retry
    assert sorted(attempts[2]["excluded"]) == sorted(fragile)  # most sensitive first
    assert [a["drop"] > 0.2 for a in attempts] == [True, True, False]
    assert report["excluded_layers"] == attempts[2]["excluded"]
    meta = _meta(variant.path)
    assert meta["runtime"]["excluded"] == attempts[2]["excluded"]
    assert meta["runtime"]["backend"] == "onnxruntime"


def test_onnxruntime_back_off_keeps_the_excluded_layers_in_fp32(backed_off_quantize):
    import onnx

    variant, _ = backed_off_quantize
    graph = onnx.load_from_string(kiln.load(str(variant.path)).onnx).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == 1


# ---- enough held-out rows to mean something ------------------------------------------


def _prune_spec(source: Path, **extra: Any) -> dict[str, Any]:
    return {
        "source": str(source),
        "steps": [{"prune": {"method": "unstructured", "amount": 0.3, "finetune_epochs": 0}}],
        **extra,
    }


def test_too_few_held_out_rows_are_refused_naming_min_rows_and_the_interval(
    iris_mlp, run_compress, tmp_path
):
    """60 iris rows split 20% test / 10% val: 18 held-out rows, fewer than the default 40."""
    from kiln.data.sources import read_table

    small = tmp_path / "small.csv"
    read_table("sklearn:iris").sample(60, random_state=0).to_csv(small, index=False)
    spec = _prune_spec(iris_mlp, data=str(small), tolerance={"max_drop": 0.01})
    with pytest.raises(SpecError) as err:
        run_compress(spec, tmp_path / "out")
    assert err.value.field == "tolerance.min_rows"
    assert "checked on 18 held-out rows (validation + test)" in err.value.message
    assert "95% confidence interval of 0." in err.value.message
    assert not (tmp_path / "out").exists()  # refused before any step ran


def test_min_rows_is_the_users_to_lower_or_raise(iris_mlp, run_compress, tmp_path):
    """iris: 15 validation + 30 test rows. 46 is refused; 45 is checked, on all 45."""
    with pytest.raises(SpecError, match="checked on 45 held-out rows"):
        run_compress(_prune_spec(iris_mlp, tolerance={"min_rows": 46}), tmp_path / "refused")
    result = run_compress(
        _prune_spec(iris_mlp, tolerance={"max_drop": 1.0, "min_rows": 45}), tmp_path / "ok"
    )
    held = result.variants[0].report["metric"]["held_out"]
    assert held["rows"] == 45
    attempt = result.variants[0].report["attempts"][0]
    assert attempt["held_out_accuracy"] == held["value"]
    assert attempt["drop_interval"] == held["drop_interval"]
