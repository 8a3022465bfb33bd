"""What compression reads and refuses: the source's own data (re-read and verified),
the ``data:`` override, and specs or steps that cannot apply to the source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import kiln
from kiln.compress.pipeline import load_compress_spec
from kiln.data.sources import read_table
from kiln.errors import DataError, NotFoundError, SpecError


def _linear_spec(source: str, **split: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "iris-csv",
        "task": "classification",
        "data": {"source": source, "target": "target"},
        "model": {"type": "linear"},
        "train": {"epochs": 5, "device": "cpu", "optimizer": {"name": "adam", "lr": 0.05}},
    }
    if split:
        spec["data"]["split"] = split
    return spec


@pytest.fixture(scope="module")
def csv_source(tmp_path_factory) -> tuple[Path, Path]:
    """A bundle trained from a CSV file; returns (bundle, csv)."""
    root = tmp_path_factory.mktemp("csv-source")
    table = root / "iris.csv"
    read_table("sklearn:iris").to_csv(table, index=False)
    out = root / "bundle"
    kiln.fit(_linear_spec(str(table)), out=out)
    return out, table


def _quantize(source: Path, **extra: Any) -> dict[str, Any]:
    return {"source": str(source), "steps": [{"quantize": {"backend": "onnxruntime"}}], **extra}


# ---- the source's data ------------------------------------------------------------------


def test_source_data_is_re_read_and_used_when_unchanged(csv_source, run_compress, tmp_path):
    bundle, _ = csv_source
    result = run_compress(_quantize(bundle), tmp_path / "out")
    source_meta = kiln.load(str(bundle)).meta
    # The same split as training: the source's recorded validation score comes back.
    assert result.source.report["metric"]["val"] == pytest.approx(
        source_meta.metrics["val"]["accuracy"]
    )


def test_changed_training_file_is_a_data_error(run_compress, tmp_path):
    table = tmp_path / "iris.csv"
    frame = read_table("sklearn:iris")
    frame.to_csv(table, index=False)
    bundle = tmp_path / "bundle"
    kiln.fit(_linear_spec(str(table)), out=bundle)
    frame.loc[0, "sepal length (cm)"] = 99.0  # one value changes after training
    frame.to_csv(table, index=False)

    with pytest.raises(DataError, match="fingerprint mismatch") as err:
        run_compress(_quantize(bundle), tmp_path / "out")
    assert err.value.field == "data"
    assert not (tmp_path / "out" / "01-quantize").exists()

    # The data: override names the labelled table to use instead; it is not fingerprinted.
    result = run_compress(_quantize(bundle, data=str(table)), tmp_path / "out2")
    assert [v.name for v in result.variants] == ["01-quantize"]
    assert kiln.load(str(result.variants[0].path)).report is not None


def test_data_override_scores_on_the_given_table(csv_source, run_compress, tmp_path):
    from kiln.data.split import holdout
    from kiln.spec.spec import Spec

    bundle, table = csv_source
    frame = read_table(str(table))
    # The same rows with every label rotated: the source now gets almost every row wrong.
    rotate = {"setosa": "versicolor", "versicolor": "virginica", "virginica": "setosa"}
    other = tmp_path / "rotated.csv"
    frame.assign(target=frame["target"].map(rotate)).to_csv(other, index=False)
    result = run_compress(_quantize(bundle, data=str(other)), tmp_path / "out")

    # The validation rows are the override's, split the way the source's spec splits.
    source = kiln.load(str(bundle))
    split = Spec.model_validate(source.meta.lineage.spec).data.split
    rows = read_table(str(other))
    parts = holdout(rows["target"], split, True)
    expected = source.evaluate(rows.iloc[parts.val])["accuracy"]
    assert expected < 0.5 < source.meta.metrics["val"]["accuracy"]
    assert result.source.report["metric"]["source_val"] == pytest.approx(expected)
    assert result.variants[0].report["metric"]["source_val"] == pytest.approx(expected)


def test_source_without_validation_split_is_a_data_error(run_compress, tmp_path):
    out = tmp_path / "no-val"
    kiln.fit(_linear_spec("sklearn:iris", val=0.0), out=out)
    with pytest.raises(DataError, match="no validation data") as err:
        run_compress(_quantize(out), tmp_path / "variants")
    assert "data.split.val: 0" in err.value.message
    assert not (tmp_path / "variants").exists()


def test_missing_source_bundle_is_not_found(run_compress, tmp_path):
    with pytest.raises(NotFoundError):
        run_compress(_quantize(tmp_path / "nowhere"), tmp_path / "out")


# ---- specs and steps that do not apply ------------------------------------------------------


def test_tolerance_metric_must_suit_the_task(iris_mlp, run_compress, tmp_path):
    with pytest.raises(SpecError, match=r"tolerance\.metric 'rmse'") as err:
        run_compress(_quantize(iris_mlp, tolerance={"metric": "rmse"}), tmp_path / "out")
    assert err.value.field == "tolerance.metric"


def test_text_student_for_a_tabular_teacher_is_a_spec_error(iris_mlp, run_compress, tmp_path):
    spec = {
        "source": str(iris_mlp),
        "steps": [{"distill": {"student": {"type": "transformer", "dim": 16, "heads": 2}}}],
    }
    with pytest.raises(SpecError, match="transformer student cannot learn from a mlp") as err:
        run_compress(spec, tmp_path / "out")
    assert err.value.field == "steps.distill.student"
    assert not (tmp_path / "out" / "01-distill").exists()


def test_structured_pruning_of_a_linear_model_is_a_clear_spec_error(
    iris_linear, run_compress, tmp_path
):
    spec = {"source": str(iris_linear), "steps": [{"prune": {"method": "structured"}}]}
    with pytest.raises(SpecError, match="structured pruning supports mlp and cnn") as err:
        run_compress(spec, tmp_path / "out")
    assert "not linear" in err.value.message
    assert err.value.field == "steps.prune.method"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fp16_without_cuda_is_a_spec_error(iris_mlp, run_compress, tmp_path):
    spec = {
        "source": str(iris_mlp),
        "steps": [{"quantize": {"method": "fp16", "backend": "torch"}}],
    }
    with pytest.raises(SpecError, match="needs a CUDA device") as err:
        run_compress(spec, tmp_path / "out")
    assert err.value.field == "steps.quantize.method"
    assert not (tmp_path / "out" / "01-quantize").exists()


def test_half_precision_on_onnxruntime_is_rejected_by_the_spec():
    with pytest.raises(SpecError, match="fp16 runs on the torch backend"):
        load_compress_spec({"source": "b", "steps": [{"quantize": {"method": "fp16"}}]})


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"source": "b", "steps": [{"prune": {"amout": 0.5}}]}, "amout"),
        ({"source": "b", "steps": [{"prnue": {}}]}, "prnue"),
        ({"source": "b", "steps": [{"prune": {}}], "tolerence": {}}, "tolerence"),
        ({"source": "b", "steps": [{"prune": {}}], "tolerance": {"max_dorp": 0.1}}, "max_dorp"),
    ],
)
def test_unknown_keys_are_spec_errors_naming_the_key(spec, key):
    with pytest.raises(SpecError, match=key):
        load_compress_spec(spec)


def test_a_compress_spec_needs_steps():
    with pytest.raises(SpecError, match="steps"):
        load_compress_spec({"source": "b", "steps": []})
    with pytest.raises(SpecError, match="amount"):
        load_compress_spec({"source": "b", "steps": [{"prune": {"amount": 1.0}}]})


def test_unknown_key_inside_a_step_is_reported_at_that_key():
    with pytest.raises(SpecError) as err:
        load_compress_spec({"source": "b", "steps": [{"prune": {"amout": 0.5}}]})
    field = err.value.field or ""
    assert field.startswith("steps.0.")
    assert field.endswith(".amout")
    assert "Step" not in field
    assert "DistillStep" not in err.value.message
    assert "QuantizeStep" not in err.value.message


def test_torch_int8_of_a_linear_model(iris_linear, run_compress, tmp_path):
    spec = {"source": str(iris_linear), "steps": [{"quantize": {"backend": "torch"}}]}
    result = run_compress(spec, tmp_path / "out")
    loaded = kiln.load(str(result.variants[0].path))
    rows = read_table("sklearn:iris").drop(columns="target")
    assert len(loaded.predict(rows).predictions) == 150
