"""``model.type: auto``: every candidate scored on non-test rows, the best one trained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import kiln
from kiln.bundle import Bundle
from kiln.data.split import holdout
from kiln.errors import SpecError
from kiln.manifest import SelectionRecord
from kiln.spec import load_spec
from kiln.train.auto import candidate_spec

ROWS = 240
NEURAL_TRAIN = {"epochs": 15, "batch_size": 32, "optimizer": {"lr": 0.05}, "device": "cpu"}


def _table(path: Path, *, corrupt_test: bool = False) -> Path:
    """A linearly separable two-class table with a categorical column; with
    ``corrupt_test`` the rows of the spec's test split get nonsense features (their
    targets, which the stratified split depends on, stay)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 3))
    y = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "yes", "no")
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    frame["colour"] = rng.choice(["red", "green", "blue"], size=ROWS)
    frame["label"] = y
    if corrupt_test:
        split = load_spec(_spec(path)).data.split
        test = holdout(frame["label"], split, stratify=True).test
        frame.loc[test, ["a", "b", "c"]] = rng.normal(scale=100.0, size=(len(test), 3))
        frame.loc[test, "colour"] = "purple"
    frame.to_csv(path, index=False)
    return path


def _spec(source: Path, **model: Any) -> dict[str, Any]:
    return {
        "name": "auto-tiny",
        "task": "classification",
        "data": {"source": str(source), "target": "label"},
        "model": {"type": "auto", **model},
        "train": dict(NEURAL_TRAIN),
    }


def _selection(bundle: Bundle | Any) -> SelectionRecord:
    assert isinstance(bundle, Bundle)
    selection = bundle.meta.training.selection
    assert selection is not None
    return selection


def _best(selection: SelectionRecord) -> str:
    """The candidate with the top score (ties: the lowest log loss)."""
    ranked = sorted(selection.candidates, key=lambda c: (-c.score, c.log_loss or 0.0))
    return ranked[0].type


def test_kfold_below_small_rows_reports_every_candidate_and_the_winner_trains(
    tmp_path: Path,
) -> None:
    spec = _spec(_table(tmp_path / "t.csv"), folds=3)
    bundle = kiln.fit(spec, out=tmp_path / "b")
    selection = _selection(bundle)
    assert selection.method == "kfold" and selection.folds == 3
    assert selection.metric == "accuracy"
    assert [c.type for c in selection.candidates] == ["linear", "mlp", "gbdt"]
    assert all(c.std is not None and c.log_loss is not None for c in selection.candidates)
    assert all(0.5 < c.score <= 1.0 for c in selection.candidates)  # separable: all learn
    assert selection.winner == _best(selection)
    # the bundle is the winner; its lineage keeps the spec as written
    assert bundle.meta.model.type == selection.winner
    assert bundle.meta.lineage.spec is not None
    assert bundle.meta.lineage.spec["model"] == {
        "type": "auto",
        "candidates": ["linear", "mlp", "gbdt"],
        "folds": 3,
        "small_rows": 2000,
    }
    loaded = Bundle.load(tmp_path / "b")
    assert loaded.meta.training.selection == selection
    assert loaded.meta.model.type == selection.winner
    raw = json.loads((tmp_path / "b" / "kiln.json").read_text())
    assert raw["training"]["selection"]["winner"] == selection.winner
    rows = [{"a": 2.0, "b": 1.0, "c": 0.0, "colour": "red"}, {"a": -2.0, "b": -1.0, "c": 0.0}]
    assert loaded.predict(rows).predictions == ["yes", "no"]


def test_holdout_from_small_rows_on_and_regression_by_r2(tmp_path: Path) -> None:
    frame = pd.read_csv(_table(tmp_path / "t.csv"))
    frame["value"] = 3.0 * frame["a"] - frame["b"]
    frame.drop(columns=["label"]).to_csv(tmp_path / "r.csv", index=False)
    spec = _spec(tmp_path / "r.csv", candidates=["linear", "gbdt"], small_rows=10)
    spec.update(task="regression", data={"source": str(tmp_path / "r.csv"), "target": "value"})
    bundle = kiln.fit(spec)
    selection = _selection(bundle)
    assert selection.method == "holdout" and selection.folds is None
    assert selection.metric == "r2"
    assert [c.type for c in selection.candidates] == ["linear", "gbdt"]
    assert all(c.std is None and c.log_loss is None for c in selection.candidates)
    assert selection.winner == max(selection.candidates, key=lambda c: c.score).type
    # an exactly linear target: the linear model fits it best
    assert selection.winner == "linear"
    assert "r2" in bundle.meta.metrics["test"]


def test_the_test_rows_never_reach_the_selection(tmp_path: Path) -> None:
    clean = _table(tmp_path / "clean.csv")
    corrupt = _table(tmp_path / "corrupt.csv", corrupt_test=True)
    assert pd.read_csv(clean).ne(pd.read_csv(corrupt)).any(axis=None)
    model = {"candidates": ["linear", "gbdt"], "folds": 2}
    a = _selection(kiln.fit(_spec(clean, **model)))
    b = _selection(kiln.fit(_spec(corrupt, **model)))
    assert a.method == "kfold"
    assert [(c.type, c.score, c.std, c.log_loss) for c in a.candidates] == [
        (c.type, c.score, c.std, c.log_loss) for c in b.candidates
    ]


def test_candidate_specs_neural_take_train_section_gbdt_boosting_defaults(
    tmp_path: Path,
) -> None:
    spec = load_spec(_spec(tmp_path / "t.csv"))
    mlp = candidate_spec(spec, "mlp", train_rows=100)
    assert mlp.model.type == "mlp"
    assert mlp.train.epochs == 15 and mlp.train.optimizer.lr == 0.05
    assert mlp.train.early_stopping is not None  # unset by the user: the auto default
    assert mlp.preprocessing.categorical == "onehot"
    gbdt = candidate_spec(spec, "gbdt", train_rows=100)
    assert gbdt.model.type == "gbdt"
    assert gbdt.train.epochs == 20 and gbdt.train.optimizer.lr == 0.001  # engine defaults
    assert gbdt.train.early_stopping is not None
    assert gbdt.train.early_stopping.metric == "val_loss"
    assert gbdt.preprocessing.categorical == "native"  # the tree default stays
    big = candidate_spec(load_spec({**_spec(tmp_path / "t.csv"), "train": {}}), "linear", 50_000)
    assert big.train.batch_size == 256 and big.train.epochs == 200


def test_needs_a_validation_split(tmp_path: Path) -> None:
    spec = _spec(_table(tmp_path / "t.csv"))
    spec["data"]["split"] = {"val": 0.0}
    with pytest.raises(SpecError, match="validation rows") as err:
        kiln.fit(spec)
    assert err.value.field == "data.split.val"


def test_cli_train_prints_the_selection_and_crossval_nests_it(tmp_path: Path) -> None:
    from kiln.cli.main import app

    spec_path = tmp_path / "spec.json"
    model = {"candidates": ["linear", "gbdt"], "small_rows": 10}
    spec_path.write_text(json.dumps(_spec(_table(tmp_path / "t.csv"), **model)))
    runner = CliRunner()
    out = tmp_path / "b"
    shown = runner.invoke(app, ["train", str(spec_path), "--out", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "model selection" in shown.output and "linear" in shown.output
    assert "(by accuracy, validation split)" in shown.output
    as_json = runner.invoke(app, ["train", str(spec_path), "--out", str(out), "--json"])
    assert as_json.exit_code == 0, as_json.output
    record = json.loads(as_json.stdout)["training"]["selection"]
    assert record["method"] == "holdout"
    assert [c["type"] for c in record["candidates"]] == ["linear", "gbdt"]
    nested = runner.invoke(app, ["crossval", str(spec_path), "--folds", "2", "--json"])
    assert nested.exit_code == 0, nested.output
    folds = json.loads(nested.stdout)["folds"]
    assert len(folds) == 2 and all(f["selected"] in ("linear", "gbdt") for f in folds)


def test_a_server_train_job_selects_and_a_crossval_job_nests_it(tmp_path: Path) -> None:
    from sklearn.datasets import load_wine

    from kiln.jobs.queue import new_job
    from kiln.jobs.worker import Worker
    from kiln.lifecycle import JobState
    from kiln.settings import Settings
    from kiln.store.crypto import open_artifacts
    from kiln.store.datasets import Intake, ingest
    from kiln.store.db import Database, migrate
    from kiln.store.projects import ensure_project
    from kiln.store.tables import Job, ModelVersion

    settings = Settings(home=tmp_path / "home", heartbeat_seconds=0.1, heartbeat_timeout=30)
    migrate(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    store = open_artifacts(settings, db)
    load_wine(as_frame=True).frame.to_csv(tmp_path / "wine.csv", index=False)
    spec: dict[str, Any] = {
        "name": "wine",
        "task": "classification",
        "data": {"target": "target"},
        "model": {"type": "auto", "candidates": ["linear", "gbdt"], "folds": 2},
        "train": {"epochs": 3, "device": "cpu"},
    }
    with db.session() as session:
        project = ensure_project(session, "default")
        intake = Intake(session, store, project)
        row = ingest(intake, name="wine", filename="wine.csv", path=tmp_path / "wine.csv")
        spec["data"]["source"] = f"dataset:{row.id}"
        train_id = new_job(session, project, "train", spec, max_attempts=1).id
        crossval_id = new_job(session, project, "crossval", spec, max_attempts=1).id
    try:
        Worker(settings, db=db, store=store).run(until_idle=True)
        with db.session() as session:
            trained, nested = session.get(Job, train_id), session.get(Job, crossval_id)
            assert trained is not None and nested is not None
            assert trained.state == JobState.succeeded, trained.error
            assert nested.state == JobState.succeeded, nested.error
            assert all(f["selected"] in ("linear", "gbdt") for f in nested.result["folds"])
            assert trained.result["version"] == 1
            version = session.get(ModelVersion, trained.model_version_id)
            assert version is not None
            store.get_dir(version.artifact_key, tmp_path / "registered")
        selection = _selection(Bundle.load(tmp_path / "registered"))
        assert [c.type for c in selection.candidates] == ["linear", "gbdt"]
    finally:
        db.dispose()
