"""CSV that kiln writes cannot run formulas in a spreadsheet (CSV injection).

A model trained on rows whose text and labels start with ``=``, ``+``, ``-``, ``@``, a
tab or a carriage return; ``kiln predict --out`` writes those rows and their predicted
labels back. Every such text cell must come out prefixed with ``'``, while numbers, a
negative ``-1.5`` in a numeric column and a numeric-looking text cell, stay numbers.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from kiln.cli.main import app
from kiln.data.csv_safe import neutralise, write_csv

runner = CliRunner()

# labels a classifier will predict back, each a formula start
LABELS = ["=1+1", "@SUM(A1)", "-2+3", "+cmd|' /C calc'!A0"]
COMMENTS = ['=HYPERLINK("http://x")', "\tnote", "\rcr", "plain", "-1.5", "-oops"]


def _table(n: int = 48) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "x": [(-1.5 if i % 2 else 2.25) + i % 4 for i in range(n)],
            "comment": [COMMENTS[i % len(COMMENTS)] for i in range(n)],
            "label": [LABELS[i % len(LABELS)] for i in range(n)],
        }
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("csv-injection")
    data = tmp / "train.csv"
    _table().to_csv(data, index=False)
    spec = {
        "name": "formulas",
        "task": "classification",
        "data": {"source": str(data), "target": "label"},
        "model": {"type": "linear"},
        "train": {"epochs": 2, "device": "cpu"},
    }
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp / "bundle"
    result = runner.invoke(app, ["train", str(tmp / "spec.yaml"), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _cells(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_kiln_predict_out_neutralises_text_cells_only(bundle: Path, tmp_path: Path) -> None:
    rows = _table(12).drop(columns="label")
    given = tmp_path / "rows.jsonl"  # jsonl keeps the leading tab and carriage return
    rows.to_json(given, orient="records", lines=True)
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(bundle), str(given), "--out", str(out)])
    assert result.exit_code == 0, result.output
    header, *body = _cells(out)
    assert header == ["x", "comment", "prediction", "probability"]
    assert len(body) == 12
    for (x, comment, prediction, probability), original in zip(
        body, rows.itertuples(), strict=True
    ):
        assert float(x) == original.x  # numbers stay numbers, negative ones included
        if original.comment in ("plain", "-1.5"):
            assert comment == original.comment
        else:
            assert comment == "'" + original.comment
        assert prediction in ["'" + label for label in LABELS]  # every label is a formula
        assert 0 < float(probability) <= 1
    # the file reads back with the numeric column numeric
    back = pd.read_csv(out)
    assert back["x"].dtype.kind == "f" and (back["x"] < 0).any()


def test_a_bad_out_suffix_is_refused_before_anything_is_written(
    bundle: Path, tmp_path: Path
) -> None:
    given = tmp_path / "rows.csv"
    _table(2).drop(columns="label").to_csv(given, index=False)
    result = runner.invoke(
        app, ["predict", str(bundle), str(given), "--out", str(tmp_path / "x.xlsx")]
    )
    assert result.exit_code != 0
    assert "x.xlsx" in result.output + result.stderr
    assert not (tmp_path / "x.xlsx").exists()


def test_write_csv_neutralises_column_names_and_keeps_numbers(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "=evil": ["@x", "ok"],
            "n": [-1, 2],
            "f": [-0.5, 1e-3],
            "mixed": ["-3", "+4.5e2"],
            "b": [True, False],
            "cat": pd.Categorical(["+1+1", "fine"]),
            "s": pd.array(["-x", None], dtype="string"),
        }
    )
    written = write_csv(frame, tmp_path / "t.tsv")
    header, *rows = [line.split("\t") for line in written.read_text().splitlines()]
    assert header == ["'=evil", "n", "f", "mixed", "b", "cat", "s"]
    assert rows == [
        ["'@x", "-1", "-0.5", "-3", "True", "'+1+1", "'-x"],
        ["ok", "2", "0.001", "+4.5e2", "False", "fine", ""],
    ]
    assert list(neutralise(frame)["'=evil"]) == ["'@x", "ok"]
    assert list(frame["=evil"]) == ["@x", "ok"]  # the caller's frame is left as it was


def test_kiln_deployments_predict_out_neutralises_too(platform: Any, tmp_path: Path) -> None:
    """The remote path: a model trained and deployed on a live server (the CLI tests'
    platform), its predictions fetched by ``kiln deployments predict --out``."""
    from kiln.client import Client

    data = tmp_path / "train.csv"
    _table().to_csv(data, index=False)
    spec = {
        "name": "formulas",
        "task": "classification",
        "data": {"target": "label"},
        "model": {"type": "linear"},
        "train": {"epochs": 2, "device": "cpu"},
    }
    with Client(platform.url, api_key=platform.admin_key, project="default") as client:
        job = client.jobs.wait(client.jobs.submit(spec, data=data)["id"], timeout=120)
        assert job["state"] == "succeeded", job
        client.deployments.create("formulas", "formulas", 1)
    given = tmp_path / "rows.jsonl"
    rows = _table(6).drop(columns="label")
    rows.to_json(given, orient="records", lines=True)
    out = tmp_path / "remote.csv"
    env = {"KILN_URL": platform.url, "KILN_API_KEY": platform.admin_key, "KILN_PROJECT": None}
    args = ["deployments", "predict", "formulas", str(given), "--out", str(out)]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    header, *body = _cells(out)
    assert header == ["x", "comment", "prediction", "probability"]
    assert [float(r[0]) for r in body] == list(rows["x"])
    assert [r[1] for r in body][:2] == ['\'=HYPERLINK("http://x")', "'\tnote"]
    assert all(r[2] in ["'" + label for label in LABELS] for r in body)
