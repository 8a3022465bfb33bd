"""``kiln.compress.pipeline.compress`` end to end on tiny iris/diabetes bundles: chained
steps with lineage, distillation, pruning (unstructured, global, structured), int8
quantization (onnxruntime and torch), the reports, and the accuracy tolerance with
back-off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kiln
from kiln.bundle import Bundle
from kiln.data.sources import read_table
from kiln.errors import SpecError

REPORT_KEYS = {
    "name",
    "step",
    "attempts",
    "backend",
    "quantization",
    "excluded_layers",
    "model_bytes",
    "disk_bytes",
    "parameters",
    "nonzeros",
    "sparsity",
    "latency",
    "peak_memory_bytes",
    "metric",
    "agreement_with_parent",
    "machine",
}
LATENCY_KEYS = (
    "batch1_p50_ms",
    "batch1_p95_ms",
    "batch32_p50_ms",
    "batch32_p95_ms",
    "throughput_rows_per_s",
)


@pytest.fixture(scope="module")
def iris_rows():
    return read_table("sklearn:iris").drop(columns="target")


def _meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "kiln.json").read_text())


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "weights.safetensors"))


def _linear_weights(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The 2-D weight matrices (nn.Linear layers), in order."""
    return [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]


def _agreement(a: Bundle, b: Bundle, rows) -> float:
    return float(np.mean(np.asarray(a.predict(rows).predictions) == b.predict(rows).predictions))


# ---- a chain: distill -> prune (unstructured) -> quantize (onnxruntime) ---------------


@pytest.fixture(scope="module")
def chain(iris_mlp, run_compress, tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "variants"
    events: list[str] = []
    spec = {
        "source": str(iris_mlp),
        "steps": [
            {
                "distill": {
                    "student": {"type": "mlp", "hidden": [16]},
                    "epochs": 60,
                    "batch_size": 16,
                    "optimizer": {"lr": 0.01},
                }
            },
            {"prune": {"method": "unstructured", "amount": 0.5, "finetune_epochs": 2}},
            {"quantize": {"method": "int8_dynamic", "backend": "onnxruntime"}},
        ],
        "tolerance": {"metric": "accuracy", "max_drop": 1.0},
    }
    result = run_compress(spec, out, on_event=events.append)
    return result, out, events


def test_each_step_is_a_saved_bundle_named_by_its_position_and_kind(chain):
    result, out, events = chain
    names = ["01-distill", "02-prune", "03-quantize"]
    assert [v.name for v in result.variants] == names
    assert sorted(p.name for p in out.iterdir()) == names  # no temporary leftovers
    for v in result.variants:
        assert v.path == out / v.name
        assert kiln.load(str(v.path)).name == "iris-mlp"
    assert any(e.startswith("01-distill: saved") for e in events)
    assert any(e.startswith("source iris-mlp: held-out accuracy") for e in events)


def test_lineage_links_each_variant_to_its_parent_and_step(chain, iris_mlp):
    result, out, _ = chain
    parents = [iris_mlp, out / "01-distill", out / "02-prune"]
    kinds = ["distill", "prune", "quantize"]
    source_meta = _meta(iris_mlp)
    for v, parent, kind in zip(result.variants, parents, kinds, strict=True):
        lineage = _meta(v.path)["lineage"]
        assert Path(lineage["parent"]["path"]) == parent
        assert lineage["parent"]["name"] == "iris-mlp"
        parent_meta = _meta(parent)
        assert lineage["parent"]["weights_sha256"] == parent_meta["files"]["weights.safetensors"]
        assert lineage["parent"]["runtime"] == parent_meta["runtime"]
        assert lineage["step"]["kind"] == kind
        # The source's training spec and data fingerprint travel along.
        assert lineage["spec"] == source_meta["lineage"]["spec"]
        assert lineage["data"]["fingerprint"] == source_meta["lineage"]["data"]["fingerprint"]
    distill_settings = _meta(out / "01-distill")["lineage"]["step"]["settings"]
    assert distill_settings["student"]["hidden"] == [16]
    assert distill_settings["epochs"] == 60


def test_compression_json_is_saved_and_loaded_back_as_the_bundle_report(chain):
    result, _, _ = chain
    for v in result.variants:
        loaded = kiln.load(str(v.path))
        assert "compression.json" in loaded.meta.files  # checksummed like the rest
        assert loaded.report == json.loads(json.dumps(v.report))
        assert set(v.report) >= REPORT_KEYS
        assert v.report["name"] == "iris-mlp"


def test_reports_hold_sizes_latency_metric_drops_agreement_and_machine(chain, iris_mlp):
    result, _, _ = chain
    source = kiln.load(str(iris_mlp))
    for v in [result.source, *result.variants]:
        r = v.report
        assert r["model_bytes"] > 0
        assert r["disk_bytes"] > 0
        assert 0 < r["nonzeros"] <= r["parameters"]
        assert r["sparsity"] == pytest.approx(1 - r["nonzeros"] / r["parameters"])
        for key in LATENCY_KEYS:
            assert r["latency"][key] > 0, key
        assert r["latency"]["runs"] == 30
        m = r["metric"]
        assert m["name"] == "accuracy"
        assert m["source_val"] == pytest.approx(result.source.report["metric"]["val"])
        # The drop the tolerance checked: on validation + test (iris: 15 + 30 rows).
        held = m["held_out"]
        assert held["rows"] == 45
        assert held["source_value"] == pytest.approx(
            result.source.report["metric"]["held_out"]["value"]
        )
        assert m["drop"] == pytest.approx(held["source_value"] - held["value"])
        assert m["relative_drop"] == pytest.approx(m["drop"] / held["source_value"])
        assert held["interval"]["method"] == "wilson"
        assert held["interval"]["low"] <= held["value"] <= held["interval"]["high"]
        assert held["drop_interval"]["low"] <= m["drop"] <= held["drop_interval"]["high"]
        assert 0 <= r["agreement_with_parent"] <= 1
        assert r["machine"]["cores"] >= 1
        assert "torch" in r["machine"]["versions"]
    # The source is compared with itself.
    assert result.source.report["agreement_with_parent"] == 1.0
    assert result.source.report["metric"]["drop"] == 0
    assert result.source.report["parameters"] == source.meta.parameters
    # The variants' own metrics land in kiln.json.
    for v in result.variants:
        meta = _meta(v.path)
        assert meta["metrics"]["val"]["accuracy"] == pytest.approx(v.report["metric"]["val"])
        assert meta["metrics"]["test"]["accuracy"] == pytest.approx(v.report["metric"]["test"])


def test_generous_tolerance_fits_each_step_at_the_first_attempt(chain):
    result, _, _ = chain
    for v in result.variants:
        attempts = v.report["attempts"]
        assert len(attempts) == 1
        assert attempts[0]["attempt"] == 1
        assert attempts[0]["drop"] == pytest.approx(v.report["metric"]["drop"])
    assert result.variants[1].report["attempts"][0]["amount"] == 0.5


def test_distilled_student_is_smaller_and_still_accurate(chain, iris_mlp):
    result, out, _ = chain
    student = result.variants[0]
    teacher = _meta(iris_mlp)
    meta = _meta(out / "01-distill")
    assert meta["model"]["type"] == "mlp"
    assert meta["model"]["hidden"] == [16]
    assert meta["parameters"] < teacher["parameters"]
    assert student.report["parameters"] == meta["parameters"]
    assert student.report["metric"]["test"] >= 0.8
    assert meta["training"]["epochs_run"] == 60
    assert meta["runtime"] == {"backend": "torch", "quantization": None}


def test_unstructured_pruning_zeroes_half_of_each_hidden_layer_through_fine_tuning(chain):
    result, out, _ = chain
    pruned = _linear_weights(_weights(out / "02-prune"))
    before = _linear_weights(_weights(out / "01-distill"))
    assert len(pruned) == 2  # the student: one hidden layer and the output layer
    hidden, output = pruned[0], pruned[1]
    # Two epochs of fine-tuning ran, and the pruned half of the hidden weights is still 0.
    assert _meta(out / "02-prune")["training"]["epochs_run"] == 2
    assert int((hidden == 0).sum()) == round(0.5 * hidden.numel())
    assert int((output == 0).sum()) == 0  # the output layer is never pruned
    kept = hidden != 0
    assert not torch.equal(hidden[kept], before[0][kept])  # fine-tuning moved the rest
    # Masks are folded in: plain weights, nothing extra saved.
    assert not any("mask" in k or "orig" in k for k in _weights(out / "02-prune"))
    report = result.variants[1].report
    assert report["parameters"] == result.variants[0].report["parameters"]
    assert report["nonzeros"] == report["parameters"] - int((hidden == 0).sum())
    step = _meta(out / "02-prune")["lineage"]["step"]
    assert step["settings"]["method"] == "unstructured"
    assert step["nonzeros"] == report["nonzeros"]


def test_onnxruntime_int8_variant_reloads_and_serves_through_onnxruntime(chain, iris_rows):
    result, out, _ = chain
    directory = out / "03-quantize"
    meta = _meta(directory)
    assert (directory / "model.onnx").is_file()
    assert "model.onnx" in meta["files"]
    assert meta["runtime"]["backend"] == "onnxruntime"
    assert meta["runtime"]["quantization"] == "int8_dynamic"
    loaded = kiln.load(str(directory))
    assert loaded.backend.name == "onnxruntime"
    import onnx

    ops = {n.op_type for n in onnx.load_from_string(loaded.onnx).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    report = result.variants[2].report
    assert report["backend"] == "onnxruntime"
    assert report["quantization"] == "int8_dynamic"
    assert report["model_bytes"] == len(loaded.onnx)
    # The int8 variant agrees with its fp32 parent on most rows.
    parent = kiln.load(str(out / "02-prune"))
    assert _agreement(loaded, parent, iris_rows) >= 0.85
    assert report["agreement_with_parent"] >= 0.8
    # The reloaded variant predicts like the one in memory.
    assert loaded.predict(iris_rows).predictions == (
        result.variants[2].bundle.predict(iris_rows).predictions
    )


def test_compress_accepts_a_yaml_file(iris_mlp, run_compress, tmp_path):
    import yaml

    path = tmp_path / "compress.yaml"
    path.write_text(
        yaml.safe_dump(
            {"source": str(iris_mlp), "steps": [{"quantize": {"backend": "onnxruntime"}}]}
        )
    )
    result = run_compress(path, tmp_path / "out")
    assert [v.name for v in result.variants] == ["01-quantize"]
    assert result.metric == "accuracy"  # the headline metric when no tolerance is given
    assert result.variants[0].report["attempts"][0]["attempt"] == 1


# ---- global pruning, torch int8, and nothing after quantization ------------------------


@pytest.fixture(scope="module")
def global_then_torch(iris_bn, run_compress, tmp_path_factory):
    out = tmp_path_factory.mktemp("global") / "variants"
    spec = {
        "source": str(iris_bn),
        "steps": [
            {"prune": {"method": "global", "amount": 0.6, "finetune_epochs": 1}},
            {"quantize": {"backend": "torch"}},
            {"prune": {"method": "unstructured", "amount": 0.3}},
        ],
    }
    with pytest.raises(SpecError) as err:
        run_compress(spec, out)
    return out, err.value


def test_pruning_a_quantized_variant_is_refused_and_earlier_variants_stay(global_then_torch):
    out, error = global_then_torch
    assert "already quantized" in error.message
    assert error.field == "steps"
    assert sorted(p.name for p in out.iterdir()) == ["01-prune", "02-quantize"]


def test_global_pruning_prunes_amount_of_all_hidden_weights(global_then_torch):
    out, _ = global_then_torch
    hidden = _linear_weights(_weights(out / "01-prune"))[:-1]
    total = sum(w.numel() for w in hidden)
    zeros = sum(int((w == 0).sum()) for w in hidden)
    assert zeros == round(0.6 * total)
    report = kiln.load(str(out / "01-prune")).report
    assert report["step"]["settings"]["method"] == "global"
    assert report["nonzeros"] <= report["parameters"] - zeros


def test_torch_int8_variant_stores_fp32_weights_and_requantizes_at_load(
    global_then_torch, iris_rows
):
    out, _ = global_then_torch
    directory = out / "02-quantize"
    meta = _meta(directory)
    assert meta["runtime"] == {"backend": "torch", "quantization": "int8_dynamic"}
    assert not (directory / "model.onnx").exists()
    parent_state = _weights(out / "01-prune")
    state = _weights(directory)
    assert state.keys() == parent_state.keys()
    assert all(state[k].dtype == parent_state[k].dtype for k in state)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    loaded = kiln.load(str(directory))
    assert loaded.backend.name == "torch"
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, dynamic) for m in loaded.backend.model.modules()) == 3
    assert not any(isinstance(m, dynamic) for m in loaded.model.modules())  # fp32 kept
    parent = kiln.load(str(out / "01-prune"))
    assert _agreement(loaded, parent, iris_rows) >= 0.85


# ---- structured pruning ------------------------------------------------------------------


@pytest.fixture(scope="module")
def structured_variant(iris_mlp, run_compress, tmp_path_factory):
    out = tmp_path_factory.mktemp("structured") / "variants"
    spec = {
        "source": str(iris_mlp),
        "steps": [{"prune": {"method": "structured", "amount": 0.5, "finetune_epochs": 1}}],
    }
    return run_compress(spec, out).variants[0]


def test_structured_pruning_removes_neurons_and_shrinks_the_architecture(
    structured_variant, iris_mlp
):
    source = _meta(iris_mlp)
    meta = _meta(structured_variant.path)
    assert source["model"]["hidden"] == [32, 16]
    assert meta["model"]["hidden"] == [16, 8]
    assert meta["parameters"] < source["parameters"]
    assert meta["parameters"] == 4 * 16 + 16 + 16 * 8 + 8 + 8 * 3 + 3
    assert structured_variant.report["parameters"] == meta["parameters"]
    shapes = [tuple(w.shape) for w in _linear_weights(_weights(structured_variant.path))]
    assert shapes == [(16, 4), (8, 16), (3, 8)]


def test_structured_variant_reloads_and_predicts_like_the_one_in_memory(
    structured_variant, iris_rows
):
    loaded = kiln.load(str(structured_variant.path))
    a = loaded.predict(iris_rows)
    b = structured_variant.bundle.predict(iris_rows)
    assert a.predictions == b.predictions
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-6, atol=1e-7)


# ---- regression ------------------------------------------------------------------------


def test_regression_distillation_trains_a_smaller_student(diabetes_mlp, run_compress, tmp_path):
    spec = {
        "source": str(diabetes_mlp),
        "steps": [
            {
                "distill": {
                    "student": {"type": "mlp", "hidden": [8]},
                    "epochs": 40,
                    "optimizer": {"lr": 0.01},
                    "alpha": 0.5,
                }
            }
        ],
        "tolerance": {"metric": "rmse", "max_drop": 1000.0},
    }
    result = run_compress(spec, tmp_path / "out")
    variant = result.variants[0]
    teacher = kiln.load(str(diabetes_mlp))
    assert variant.bundle.meta.parameters < teacher.meta.parameters
    m = variant.report["metric"]
    assert m["name"] == "rmse"
    held = m["held_out"]
    assert m["drop"] == pytest.approx(held["value"] - held["source_value"])  # a rise is a drop
    assert held["interval"]["method"] == "bootstrap"
    assert held["interval"]["low"] <= held["value"] <= held["interval"]["high"]
    target = read_table("sklearn:diabetes")["target"]
    assert np.isfinite(m["test"])
    assert m["test"] < float(target.std())  # better than predicting the mean
    assert -1.0 <= variant.report["agreement_with_parent"] <= 1.0  # R² against the teacher
    assert variant.report["agreement_with_parent"] > 0
    loaded = kiln.load(str(variant.path))
    rows = target.to_frame().join(read_table("sklearn:diabetes").drop(columns="target"))
    preds = loaded.predict(rows.drop(columns="target")).predictions
    assert len(preds) == len(rows)
    assert all(isinstance(p, float) for p in preds)
