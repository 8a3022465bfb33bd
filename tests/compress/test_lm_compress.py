"""``kiln compress`` on generation bundles, end to end on a tiny gpt trained here:
onnxruntime-genai int4 (through the CLI), torch int8, distillation into a smaller
student, a tolerance that fails, and the report's figures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

import kiln
from kiln.cli.main import app
from kiln.compress.lm_report import LMVariantReport
from kiln.compress.pipeline import CompressToleranceError, compress
from kiln.lm_bundle import LMBundle
from support import gpt_spec, offline_json, write_chats

PROMPT = "I want a green kite. Which colour?"
TOLERANCE = {"metric": "perplexity", "max_drop": 0.5, "min_rows": 10}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models decode fastest on one thread (the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> LMBundle:
    root = tmp_path_factory.mktemp("lm-compress")
    chats = write_chats(root / "chats.jsonl", n=60)
    bundle = kiln.fit(gpt_spec(chats, epochs=4), out=root / "teacher")
    assert isinstance(bundle, LMBundle)
    return bundle


def _spec(teacher: LMBundle, step: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"source": str(teacher.path), "steps": [step], "tolerance": TOLERANCE, **extra}


@pytest.fixture(scope="module")
def int4(teacher: LMBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The int4 variant, made by ``kiln compress SPEC --out DIR --json``."""
    root = tmp_path_factory.mktemp("int4")
    spec = root / "compress.yaml"
    spec.write_text(yaml.safe_dump(_spec(teacher, {"quantize": {"method": "int4_weight"}})))
    result = CliRunner().invoke(
        app, ["compress", str(spec), "--out", str(root / "out"), "--runs", "30", "--json"]
    )
    assert result.exit_code == 0, result.output
    return root / "out"


RELOAD = """
import json, sys
import kiln
bundle = kiln.load(sys.argv[1])
done = bundle.generate(sys.argv[2], max_new_tokens=8)
print(json.dumps({"text": done.text, "ids": done.token_ids, "engine": bundle.generator.name}))
"""


def test_int4_variant_loads_in_a_fresh_process_and_generates(int4: Path, teacher: LMBundle) -> None:
    variant = int4 / "01-quantize"
    meta = json.loads((variant / "kiln.json").read_text())
    runtime = meta["runtime"]
    assert (runtime["backend"], runtime["quantization"]) == ("onnxruntime-genai", "int4_weight")
    assert "weights.safetensors" not in meta["files"]  # the genai model is what it runs
    assert any(f.startswith("genai/") and f.endswith(".onnx") for f in meta["files"])
    parent, step = meta["lineage"]["parent"], meta["lineage"]["step"]
    assert parent["path"] == str(teacher.path)
    assert parent["weights_sha256"] == teacher.meta.files["weights.safetensors"]
    assert step["kind"] == "quantize" and step["settings"]["precision"] == "int4"
    there = offline_json(RELOAD, str(variant), PROMPT)
    assert there["engine"] == "onnxruntime-genai" and there["ids"]
    here = LMBundle.load(variant).generate(PROMPT, max_new_tokens=8)
    assert (there["text"], there["ids"]) == (here.text, here.token_ids)


def test_report_fields_are_present_and_plausible(int4: Path, teacher: LMBundle) -> None:
    report = json.loads((int4 / "report.json").read_text())
    source, variant = (LMVariantReport.model_validate(r) for r in report["reports"])
    assert [row["variant"] for row in report["variants"]] == ["source", "01-quantize"]
    assert variant.quantization == "int4_weight" and source.quantization is None
    assert 0 < variant.model_bytes < source.model_bytes  # 4-bit weights are smaller
    for r in (source, variant):
        speed = r.speed
        assert speed.tokens_per_s_batch1 > 0 and speed.tokens_per_s_batch8 > 0
        assert 0 < speed.first_token_ms < 5_000
        assert r.metric.name == "perplexity" and r.metric.rows == 18
    # the source's figure is its own held-out perplexity; the variant's is close to it
    assert source.metric.drop == 0 and source.metric.value == pytest.approx(source.perplexity)
    assert variant.metric.drop == pytest.approx(variant.perplexity / source.perplexity - 1)
    assert abs(variant.metric.drop) < 0.5
    assert variant.attempts[0]["precision"] == "int4"
    assert (
        variant.metric.drop_interval.low <= variant.metric.drop <= variant.metric.drop_interval.high
    )
    saved = json.loads((int4 / "01-quantize" / "compression.json").read_text())
    assert saved["model_bytes"] == variant.model_bytes


def test_torch_int8_variant_generates_and_keeps_perplexity(
    teacher: LMBundle, tmp_path: Path
) -> None:
    step = {"quantize": {"method": "int8_dynamic", "backend": "torch"}}
    result = compress(_spec(teacher, step), tmp_path, measure_runs=30)
    variant = LMBundle.load(tmp_path / "01-quantize")
    assert variant.meta.runtime.quantization == "int8_dynamic"
    assert variant.meta.runtime.backend == "torch"
    quantized = torch.ao.nn.quantized.dynamic.Linear
    engine: Any = variant.generator
    assert any(isinstance(m, quantized) for m in engine.model.modules())
    assert variant.generate(PROMPT, max_new_tokens=6).token_ids
    report = LMVariantReport.model_validate(result.variants[0].report)
    source = LMVariantReport.model_validate(result.source.report)
    assert report.perplexity == pytest.approx(source.perplexity, rel=0.05)
    assert report.model_bytes < source.model_bytes  # int8 linear weights


def test_distill_makes_a_smaller_student_whose_parent_is_the_teacher(
    teacher: LMBundle, tmp_path: Path
) -> None:
    student = {"type": "gpt", "layers": 1, "heads": 2, "dim": 16, "max_length": 64}
    step = {"distill": {"student": student, "epochs": 6, "batch_size": 8, "temperature": 2.0}}
    result = compress(_spec(teacher, step, tolerance=None), tmp_path, measure_runs=30)
    distilled = LMBundle.load(tmp_path / "01-distill")
    assert distilled.meta.parameters < teacher.meta.parameters / 2
    assert distilled.meta.lineage.parent is not None
    assert distilled.meta.lineage.parent.path == str(teacher.path)
    assert distilled.meta.lineage.step is not None and distilled.meta.lineage.step.kind == "distill"
    # the teacher's tokenizer and vocabulary, not a BPE of its own
    assert distilled.tokenizer.get_vocab() == teacher.tokenizer.get_vocab()
    assert distilled.meta.model_context["hf_config"]["vocab_size"] == len(teacher.tokenizer)
    history = distilled.meta.training.history
    assert len(history) == 6 and history[-1]["train_loss"] < history[0]["train_loss"]
    report = LMVariantReport.model_validate(result.variants[0].report)
    assert report.perplexity < len(teacher.tokenizer) / 4  # far better than guessing
    assert distilled.generate(PROMPT, max_new_tokens=4).completion_tokens > 0


def test_a_step_out_of_tolerance_is_reported(teacher: LMBundle, tmp_path: Path) -> None:
    student = {"type": "gpt", "layers": 1, "heads": 2, "dim": 8, "max_length": 64}
    step = {"distill": {"student": student, "epochs": 1, "batch_size": 16}}
    tight = {**TOLERANCE, "max_drop": 0.01}
    with pytest.raises(CompressToleranceError, match=r"perplexity within 0\.01") as caught:
        compress(_spec(teacher, step, tolerance=tight), tmp_path, measure_runs=30)
    assert len(caught.value.attempts) == 1 and caught.value.attempts[0].drop > 0.01
    assert caught.value.partial.variants == []
    assert not (tmp_path / "01-distill").exists()


def test_generation_specs_refuse_a_metric_that_does_not_apply(
    teacher: LMBundle, tmp_path: Path
) -> None:
    step = {"quantize": {"method": "int8_dynamic", "backend": "torch"}}
    bad = {**TOLERANCE, "metric": "accuracy"}
    with pytest.raises(kiln.SpecError, match="perplexity or exact_match"):
        compress(_spec(teacher, step, tolerance=bad), tmp_path)
    with pytest.raises(kiln.SpecError, match="int4_weight runs on the onnxruntime"):
        compress(
            _spec(teacher, {"quantize": {"method": "int4_weight", "backend": "torch"}}), tmp_path
        )
