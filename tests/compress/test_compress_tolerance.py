"""The accuracy tolerance: a step that loses too much backs off (pruning halves its amount,
onnxruntime int8 leaves one more sensitive layer in fp32) and retries; a step that cannot
fit raises ToleranceError and keeps the variants before it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import kiln
from kiln.compress import pipeline
from kiln.errors import ToleranceError


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
    amounts: list[float] = []
    real_prune = pipeline._prune

    def spy(step, parent, splits, amount):
        amounts.append(amount)
        return real_prune(step, parent, splits, amount)

    spec = {
        "source": str(iris_mlp),
        "steps": [
            {"prune": {"method": "unstructured", "amount": 0.9, "finetune_epochs": 0}},
            {"prune": {"method": "unstructured", "amount": 0.9, "finetune_epochs": 1, "lr": 50}},
        ],
        "tolerance": {"metric": "accuracy", "max_drop": 0.0, "retries": 3},
    }
    events: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "_prune", spy)
        with pytest.raises(ToleranceError) as err:
            run_compress(spec, out, on_event=events.append)
    return out, err.value, amounts, events


def test_impossible_tolerance_raises_naming_the_attempts(tolerance_failure):
    _, error, _, events = tolerance_failure
    assert "prune could not keep val accuracy within 0.0" in error.message
    assert "after 4 attempt(s)" in error.message
    assert "variants before this step are kept" in error.message
    assert error.field == "tolerance.max_drop"
    assert error.exit_code == 9
    assert sum("prune attempt" in e for e in events[-4:]) == 4


def test_back_off_halves_the_amount_on_each_retry(tolerance_failure):
    out, _, amounts, _ = tolerance_failure
    first = kiln.load(str(out / "01-prune")).report["attempts"]
    n = len(first)
    assert n >= 2  # 90% without fine-tuning loses accuracy: it had to back off
    assert amounts[:n] == [0.9 / 2**i for i in range(n)]
    assert amounts[n:] == [0.9, 0.45, 0.225, 0.1125]  # the failing step: all retries used


def test_back_off_is_recorded_in_the_report_of_the_step_that_fit(tolerance_failure):
    out, _, _, _ = tolerance_failure
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
    out, _, _, _ = tolerance_failure
    assert [p.name for p in out.iterdir()] == ["01-prune"]  # no 02-prune, no temp dirs
    assert kiln.load(str(out / "01-prune")).report is not None


# ---- onnxruntime back-off: one more sensitive layer left in fp32 per retry -------------


def _spy_ort_int8(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real = pipeline.ort_int8

    def spy(graph: bytes, exclude: list[str] | None = None) -> bytes:
        calls.append(list(exclude or []))
        return real(graph, exclude=exclude)

    monkeypatch.setattr(pipeline, "ort_int8", spy)
    return calls


def _ranking(source: Path) -> list[str]:
    bundle = kiln.load(str(source))
    return pipeline._sensitive_layers(bundle, pipeline._splits(bundle, None))


def test_onnxruntime_back_off_excludes_the_most_sensitive_layers_one_more_per_retry(
    iris_mlp, run_compress, tmp_path, monkeypatch
):
    calls = _spy_ort_int8(monkeypatch)
    # Whatever the variant scores, call it too far off: every retry is used.
    monkeypatch.setattr(pipeline, "_drop", lambda metric, base, value: 1.0)
    spec = {
        "source": str(iris_mlp),
        "steps": [{"quantize": {"backend": "onnxruntime"}}],
        "tolerance": {"max_drop": 0.5, "retries": 2},
    }
    with pytest.raises(ToleranceError, match=r"quantize could not .* after 3 attempt\(s\)"):
        run_compress(spec, tmp_path / "out")
    ranking = _ranking(iris_mlp)
    assert len(ranking) == 3  # the MLP's three Linear layers
    assert calls == [[], ranking[:1], ranking[:2]]
    assert not (tmp_path / "out" / "01-quantize").exists()


@pytest.fixture
def backed_off_quantize(iris_mlp, run_compress, tmp_path, monkeypatch):
    """An onnxruntime step whose first attempt (everything int8) is called too far off."""
    calls = _spy_ort_int8(monkeypatch)
    real_drop = pipeline._drop

    def drop(metric: str, base: float, value: float) -> float:
        return 1.0 if calls and calls[-1] == [] else real_drop(metric, base, value)

    monkeypatch.setattr(pipeline, "_drop", drop)
    spec = {
        "source": str(iris_mlp),
        "steps": [{"quantize": {"backend": "onnxruntime"}}],
        "tolerance": {"max_drop": 0.5, "retries": 3},
    }
    return run_compress(spec, tmp_path / "out").variants[0], _ranking(iris_mlp)


def test_onnxruntime_back_off_is_recorded_in_the_variant(backed_off_quantize):
    variant, ranking = backed_off_quantize
    report = variant.report
    assert [a["attempt"] for a in report["attempts"]] == [1, 2]
    assert "excluded" not in report["attempts"][0]
    assert report["attempts"][1]["excluded"] == ranking[:1]
    assert report["excluded_layers"] == ranking[:1]
    meta = _meta(variant.path)
    assert meta["runtime"]["excluded"] == ranking[:1]
    assert meta["runtime"]["backend"] == "onnxruntime"


def test_onnxruntime_back_off_keeps_the_excluded_layer_in_fp32(backed_off_quantize):
    import onnx

    variant, _ = backed_off_quantize
    graph = onnx.load_from_string(kiln.load(str(variant.path)).onnx).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == 2
