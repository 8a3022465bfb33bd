"""The CLI with a gbdt spec: train (rounds in the history, --json), inspect (importances
instead of layers), predict, crossval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from kiln.cli.main import app

runner = CliRunner()
ROUNDS = 15


def _table(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """The label depends on x1 and color; x2 is noise; x1 and color have missing values."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=n)
    color = rng.choice(["red", "green", "blue"], size=n).astype(object)
    label = np.where(x1 + 1.5 * (color == "red") > 0.3, "yes", "no")
    x1[::9] = np.nan
    color[::13] = None
    return pd.DataFrame({"x1": x1, "x2": rng.uniform(size=n), "color": color, "label": label})


def _spec(tmp_path: Path, library: str) -> Path:
    source = tmp_path / "table.csv"
    _table().to_csv(source, index=False)
    spec = {
        "name": "trees",
        "task": "classification",
        "data": {"source": str(source), "target": "label", "split": {"val": 0.2}},
        "model": {
            "type": "gbdt",
            "library": library,
            "n_estimators": ROUNDS,
            "learning_rate": 0.3,
            "num_leaves": 8,
            "min_child_samples": 5,
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module", params=["lightgbm", "xgboost"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp(f"gbdt-cli-{request.param}")
    out, log = tmp / "bundle", tmp / "log.jsonl"
    args = ["train", str(_spec(tmp, request.param)), "--out", str(out), "--json"]
    result = runner.invoke(app, [*args, "--log-jsonl", str(log)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["bundle"] == str(out)
    assert doc["test"]["accuracy"] > 0.8
    assert doc["training"]["epochs_run"] == ROUNDS
    # progress counts boosting rounds: one epoch event per round
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[0] == {"event": "start", "epochs": ROUNDS, "start_epoch": 0}
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == list(range(1, ROUNDS + 1))
    return out


def test_train_shows_rounds_in_the_progress_bar(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["train", str(_spec(tmp_path, "lightgbm")), "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 0, result.output
    assert f"{ROUNDS} rounds" in result.output  # "trained trees in ...s, 15 rounds"
    assert "test accuracy" in result.output


def test_inspect_json_has_the_trees_and_importances(trained: Path) -> None:
    result = runner.invoke(app, ["inspect", str(trained), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    trees = doc["trees"]
    assert trees["library"] == doc["model"]["library"]
    assert trees["rounds"] == ROUNDS and trees["trees"] == ROUNDS
    assert trees["leaves"] >= 2 * ROUNDS
    assert doc["layers"] == []
    names = [f["feature"] for f in trees["importance"]]
    assert sorted(names) == ["color", "x1", "x2"]
    gains = [f["gain"] for f in trees["importance"]]
    assert gains == sorted(gains, reverse=True)
    assert names[-1] == "x2"  # the noise column gains least


def test_inspect_table_shows_importances_not_layers(trained: Path) -> None:
    result = runner.invoke(app, ["inspect", str(trained)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{ROUNDS} rounds" in out
    assert "importance (total gain)" in out
    assert "layers" not in out
    for name in ("x1", "color", "x2"):
        assert name in out


def test_predict_works_with_missing_and_unseen_values(trained: Path, tmp_path: Path) -> None:
    rows = pd.DataFrame(
        {"x1": [2.0, None, -2.0], "x2": [0.5, 0.1, None], "color": ["red", "purple", None]}
    )
    path = tmp_path / "rows.csv"
    rows.to_csv(path, index=False)
    result = runner.invoke(app, ["predict", str(trained), str(path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert len(doc["predictions"]) == 3
    assert doc["predictions"][0] == "yes" and doc["predictions"][2] == "no"
    probs = np.asarray(doc["probabilities"])
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_crossval_of_a_gbdt_spec(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "xgboost")
    result = runner.invoke(app, ["crossval", str(spec), "--folds", "3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["k"] == 3
    assert doc["mean"]["accuracy"] > 0.8
    assert all(f["epochs_run"] == ROUNDS for f in doc["folds"])
