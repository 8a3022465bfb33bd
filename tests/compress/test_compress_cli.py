"""``kiln compress`` through the CLI (typer's CliRunner, in process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import kiln
from kiln.cli.main import app
from kiln.compress import measure

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_peak_memory(monkeypatch):
    """The peak-memory subprocess costs seconds per bundle; measured for real elsewhere."""
    monkeypatch.setattr(measure, "peak_memory", lambda directory: None)


def _write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "compress.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ---- kiln compress -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compressed_json(iris_mlp, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli-compress")
    spec = _write_spec(
        tmp_path,
        {
            "source": str(iris_mlp),
            "steps": [
                {"prune": {"method": "unstructured", "amount": 0.3, "finetune_epochs": 1}},
                {"quantize": {"backend": "onnxruntime"}},
            ],
            "tolerance": {"max_drop": 0.5},
        },
    )
    out = tmp_path / "variants"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(measure, "peak_memory", lambda directory: None)
        result = runner.invoke(
            app, ["compress", str(spec), "--out", str(out), "--json", "--runs", "30"]
        )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_compress_json_prints_one_document_with_every_variant(compressed_json):
    doc, _ = compressed_json
    assert doc["metric"] == "accuracy"
    names = [r["variant"] for r in doc["variants"]]
    assert names == ["source", "01-prune", "02-quantize"]
    assert len(doc["reports"]) == 3
    for row in doc["variants"]:
        assert row["p50_ms_b1"] > 0
        assert row["rows_per_s"] > 0
        assert isinstance(row["pareto_size"], bool)
        assert isinstance(row["pareto_latency"], bool)
        assert 0 <= row["accuracy"] <= 1
    assert doc["variants"][2]["backend"] == "onnxruntime int8_dynamic"
    assert doc["reports"][1]["step"]["kind"] == "prune"


def test_compress_writes_report_json_and_a_pareto_png(compressed_json):
    doc, out = compressed_json
    assert json.loads((out / "report.json").read_text()) == doc
    assert (out / "pareto.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in out.iterdir()) == [
        "01-prune",
        "02-quantize",
        "pareto.png",
        "report.json",
    ]
    # The report of each variant matches its compression.json.
    for report, name in zip(doc["reports"][1:], ["01-prune", "02-quantize"], strict=True):
        assert kiln.load(str(out / name)).report == report


def test_compress_prints_a_table_without_json(iris_mlp, tmp_path, no_peak_memory):
    spec = _write_spec(
        tmp_path, {"source": str(iris_mlp), "steps": [{"quantize": {"backend": "onnxruntime"}}]}
    )
    out = tmp_path / "variants"
    result = runner.invoke(
        app, ["compress", str(spec), "--out", str(out), "--runs", "30", "--report", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "01-quantize" in result.stdout
    assert "compression trade-offs" in result.stdout
    assert "tolerance checked on 45 held-out rows, 95% CI" in result.stdout
    doc = json.loads((out / "report.json").read_text())
    held = doc["reports"][1]["metric"]["held_out"]
    ci = held["interval"]
    # The held-out cell: the value and its interval, as the report holds them.
    assert f"{held['value']:.4f} [{ci['low']:.3f}, {ci['high']:.3f}]" in result.stdout
    assert "Pareto plot" in result.stdout
    assert (out / "pareto.png").is_file()


def test_bad_compress_spec_exits_3_naming_the_unknown_key(iris_mlp, tmp_path):
    spec = _write_spec(tmp_path, {"source": str(iris_mlp), "steps": [{"prune": {"amout": 0.5}}]})
    result = runner.invoke(app, ["compress", str(spec), "--out", str(tmp_path / "o")])
    assert result.exit_code == 3, result.output
    assert "amout" in result.output
    assert "unknown key" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_tolerance_failure_exits_9(iris_mlp, tmp_path, no_peak_memory):
    spec = _write_spec(
        tmp_path,
        {
            "source": str(iris_mlp),
            "steps": [{"distill": {"student": {"type": "linear"}, "epochs": 1}}],
            "tolerance": {"max_drop": 0.0, "metric": "log_loss"},
        },
    )
    result = runner.invoke(app, ["compress", str(spec), "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 9, result.output
    assert "distill could not keep held-out log_loss" in result.output


def test_runs_below_30_are_refused(iris_mlp, tmp_path):
    spec = _write_spec(tmp_path, {"source": str(iris_mlp), "steps": [{"quantize": {}}]})
    result = runner.invoke(
        app, ["compress", str(spec), "--out", str(tmp_path / "o"), "--runs", "5"]
    )
    assert result.exit_code == 2


def test_export_of_a_quantized_variant_exits_8(compressed_json):
    _, out = compressed_json
    result = runner.invoke(app, ["export", str(out / "02-quantize")])
    assert result.exit_code == 8, result.output
    assert "quantized" in result.output
