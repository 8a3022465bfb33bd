"""Bad input that used to slip through: stray strings, shifted row numbers, float-typed
categories, tampered tokenizers, inconsistent manifests, relative data paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import kiln
from kiln.cli.main import app
from kiln.data.sources import read_table
from kiln.errors import BundleError, DataError


def _wine_csv(tmp_path: Path) -> Path:
    frame = read_table("sklearn:wine")
    path = tmp_path / "wine.csv"
    frame.to_csv(path, index=False)
    return path


def _spec(source: Path, **data: object) -> dict[str, object]:
    return {
        "name": "wine",
        "task": "classification",
        "data": {"source": str(source), "target": "target", **data},
        "model": {"type": "linear"},
        "train": {"epochs": 2, "device": "cpu"},
    }


def test_a_stray_string_in_a_numeric_column_is_named_by_row(tmp_path: Path) -> None:
    path = _wine_csv(tmp_path)
    frame = pd.read_csv(path)
    frame["alcohol"] = frame["alcohol"].astype(object)
    frame.loc[10, "alcohol"] = "abc"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"'alcohol', row 10: 'abc' is not a number"):
        kiln.fit(_spec(path))


def test_row_numbers_survive_dropped_rows(tmp_path: Path) -> None:
    path = _wine_csv(tmp_path)
    frame = pd.read_csv(path)
    frame.loc[3, "target"] = None  # dropped: no label
    frame.loc[10, "alcohol"] = float("inf")
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"'alcohol', row 10: value is infinite"):
        kiln.fit(_spec(path))


def test_float_typed_categories_match_their_training_names(tmp_path: Path) -> None:
    path = tmp_path / "cats.csv"
    # A categorical column (one non-number) whose prediction input holds only numbers.
    rows = [
        {"cat": ["1", "2", "x"][i % 3], "x": i % 2 * 1.0, "y": ["a", "b"][i % 2]} for i in range(60)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    spec = {**_spec(path), "data": {"source": str(path), "target": "y", "split": {"seed": 1}}}
    bundle = kiln.fit(spec)
    as_floats = pd.DataFrame({"cat": [1.0, 2.0, None], "x": [0.0, 1.0, 0.0]})
    encoded = bundle.preprocessor.transform(as_floats)
    as_strings = bundle.preprocessor.transform(
        pd.DataFrame({"cat": ["1", "2", None], "x": [0.0, 1.0, 0.0]})
    )
    assert (encoded == as_strings).all()
    assert encoded[:2, :3].sum() == 2  # one-hot set, not all zeros


def test_inconsistent_manifest_is_a_bundle_error(tmp_path: Path) -> None:
    kiln.fit(_spec(_wine_csv(tmp_path)), out=tmp_path / "b")
    meta_path = tmp_path / "b" / "kiln.json"
    meta = json.loads(meta_path.read_text())
    meta["n_inputs"] = 5
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="inputs"):
        kiln.load(str(tmp_path / "b"))
    meta["n_inputs"] = -3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError):
        kiln.load(str(tmp_path / "b"))


def test_unlisted_tokenizer_files_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "text.csv"
    pd.DataFrame(
        {
            "t": [f"good film {i}" if i % 2 else f"bad film {i}" for i in range(40)],
            "y": ["pos" if i % 2 else "neg" for i in range(40)],
        }
    ).to_csv(data, index=False)
    spec = {
        "name": "text",
        "task": "classification",
        "data": {"source": str(data), "target": "y", "text": "t"},
        "model": {"type": "transformer", "layers": 1, "dim": 16, "heads": 2, "vocab_size": 100},
        "train": {"epochs": 1, "device": "cpu"},
    }
    kiln.fit(spec, out=tmp_path / "b")
    meta_path = tmp_path / "b" / "kiln.json"
    meta = json.loads(meta_path.read_text())
    meta["files"] = {k: v for k, v in meta["files"].items() if not k.startswith("tokenizer/")}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="tokenizer"):
        kiln.load(str(tmp_path / "b"))


def test_compress_finds_relative_training_data_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "project"
    work.mkdir()
    _wine_csv(work)
    monkeypatch.chdir(work)
    spec = _spec(Path("wine.csv"))
    spec["model"] = {"type": "mlp", "hidden": [8]}
    kiln.fit(spec, out="bundle")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from kiln.compress import measure
    from kiln.compress.pipeline import compress

    monkeypatch.setattr(measure, "peak_memory", lambda directory: None)
    result = compress(
        {"source": str(work / "bundle"), "steps": [{"quantize": {"backend": "torch"}}]},
        elsewhere / "out",
        measure_runs=30,
    )
    assert result.variants[0].path is not None


def test_export_to_a_missing_folder_is_a_clean_error(tmp_path: Path) -> None:
    kiln.fit(_spec(_wine_csv(tmp_path)), out=tmp_path / "b")
    runner = CliRunner()
    missing = runner.invoke(app, ["export", str(tmp_path / "b"), "--out", "/nope/x.onnx"])
    assert missing.exit_code == 6 and "Traceback" not in missing.output
    folder = runner.invoke(app, ["export", str(tmp_path / "b"), "--out", str(tmp_path)])
    assert folder.exit_code == 8


def test_a_failed_compress_still_reports_the_variants_that_fit(tmp_path: Path) -> None:
    source = tmp_path / "b"
    spec = _spec(_wine_csv(tmp_path))
    spec["model"] = {"type": "mlp", "hidden": [16]}
    spec["train"] = {"epochs": 30, "device": "cpu", "optimizer": {"name": "adam", "lr": 0.01}}
    kiln.fit(spec, out=source)
    compress_spec = tmp_path / "c.yaml"
    compress_spec.write_text(
        json.dumps(
            {
                "source": str(source),
                "steps": [
                    {"prune": {"method": "unstructured", "amount": 0.05, "finetune_epochs": 0}},
                    {"prune": {"method": "unstructured", "amount": 0.99, "finetune_epochs": 0}},
                ],
                "tolerance": {"metric": "accuracy", "max_drop": 0.05, "retries": 0},
            }
        )
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(compress_spec), "--out", str(out), "-q"])
    assert result.exit_code == 9, result.output
    report = json.loads((out / "report.json").read_text())
    assert [v["variant"] for v in report["variants"]] == ["source", "01-prune"]
    assert (out / "pareto.png").is_file()
    shutil.rmtree(out, ignore_errors=True)
