"""The kiln CLI end to end: train, inspect, predict, evaluate, crossval, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from kiln.cli.main import app
from support import wait_for

runner = CliRunner()


def _spec(tmp_path: Path, **overrides: object) -> Path:
    spec: dict[str, object] = {
        "name": "iris-mlp",
        "task": "classification",
        "data": {"source": "sklearn:iris", "target": "target"},
        "model": {"type": "mlp", "hidden": [16]},
        "train": {"epochs": 25, "optimizer": {"name": "adam", "lr": 0.01}},
    }
    spec.update(overrides)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "models" / "iris"
    result = runner.invoke(app, ["train", str(_spec(tmp)), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_bundle_and_reports_test_accuracy(trained: Path) -> None:
    assert sorted(p.name for p in trained.iterdir()) == [
        "kiln.json",
        "preprocess.json",
        "weights.safetensors",
    ]
    meta = json.loads((trained / "kiln.json").read_text())
    assert meta["metrics"]["test"]["accuracy"] > 0.8
    # The checkpoint directory is removed once the bundle is saved.
    assert not (trained.parent / ".iris.ckpt").exists()


def test_train_json_output_is_one_document(tmp_path: Path) -> None:
    out = tmp_path / "m"
    result = runner.invoke(app, ["train", str(_spec(tmp_path)), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["bundle"] == str(out)
    assert 0.0 <= doc["test"]["accuracy"] <= 1.0
    assert doc["training"]["epochs_run"] == 25


def test_train_log_jsonl_has_one_line_per_epoch(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    args = ["train", str(_spec(tmp_path)), "--out", str(tmp_path / "m"), "-q"]
    result = runner.invoke(app, [*args, "--log-jsonl", str(log)])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in log.read_text().splitlines()]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, 26))
    assert {"train_loss", "val_loss", "val_accuracy", "lr"} <= set(epochs[0])
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"


def test_predict_json_gives_labels_and_probabilities(trained: Path, tmp_path: Path) -> None:
    from kiln.data.sources import read_table

    rows = read_table("sklearn:iris").iloc[[0, 60, 120]]
    csv = tmp_path / "rows.csv"
    rows.drop(columns=["target"]).to_csv(csv, index=False)
    result = runner.invoke(app, ["predict", str(trained), str(csv), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["labels"] == ["setosa", "versicolor", "virginica"]
    assert doc["predictions"] == ["setosa", "versicolor", "virginica"]
    assert all(abs(sum(p) - 1.0) < 1e-5 for p in doc["probabilities"])


def test_predict_table_and_jsonl_input(trained: Path, tmp_path: Path) -> None:
    from kiln.data.sources import read_table

    jsonl = tmp_path / "rows.jsonl"
    read_table("sklearn:iris").head(3).to_json(jsonl, orient="records", lines=True)
    result = runner.invoke(app, ["predict", str(trained), str(jsonl)])
    assert result.exit_code == 0, result.output
    assert "setosa" in result.stdout and "3 prediction(s)" in result.stdout


def test_evaluate_json(trained: Path, tmp_path: Path) -> None:
    from kiln.data.sources import read_table

    csv = tmp_path / "labelled.csv"
    read_table("sklearn:iris").to_csv(csv, index=False)
    result = runner.invoke(app, ["evaluate", str(trained), str(csv), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["rows"] == 150
    assert doc["accuracy"] > 0.8
    assert len(doc["confusion_matrix"]) == 3


def test_inspect_shows_layers_and_parameter_counts(trained: Path) -> None:
    result = runner.invoke(app, ["inspect", str(trained), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    # 4 inputs -> 16 -> 3: (4*16 + 16) + (16*3 + 3) = 131
    assert doc["parameters"] == 131
    assert [layer["kind"] for layer in doc["layers"]] == ["Linear", "ReLU", "Linear"]
    assert doc["layers"][-1]["output_shape"] == [3]
    text = runner.invoke(app, ["inspect", str(trained)])
    assert text.exit_code == 0 and "131" in text.stdout and "Linear" in text.stdout


def test_crossval_json_reports_mean_and_std(tmp_path: Path) -> None:
    spec = _spec(tmp_path, train={"epochs": 10, "optimizer": {"name": "adam", "lr": 0.02}})
    result = runner.invoke(app, ["crossval", str(spec), "--folds", "3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["k"] == 3 and len(doc["folds"]) == 3
    accs = [f["accuracy"] for f in doc["folds"]]
    assert doc["mean"]["accuracy"] == pytest.approx(sum(accs) / 3)
    assert doc["std"]["accuracy"] >= 0.0


@pytest.mark.parametrize(
    ("content", "code", "needle"),
    [
        (
            "name: x\ntask: classification\ndata: {source: sklearn:iris, target: target}\n"
            "model: {type: mlp, hiden: [4]}\n",
            3,
            "model.hiden",
        ),
        (
            "name: x\ntask: classification\ndata: {source: sklearn:iris, target: nope}\n"
            "model: {type: mlp}\n",
            4,
            "'nope'",
        ),
        (
            "name: x\ntask: classification\ndata: {source: missing.csv, target: y}\n"
            "model: {type: mlp}\n",
            6,
            "missing.csv",
        ),
        ("name: [unclosed\n", 3, "line 1"),
    ],
)
def test_bad_spec_exits_with_code_and_names_the_problem(
    tmp_path: Path, content: str, code: int, needle: str
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(content)
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(spec), "--out", str(out), "-q"])
    assert result.exit_code == code, result.output
    assert needle in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_predict_bad_value_names_column_and_row(trained: Path, tmp_path: Path) -> None:
    csv = tmp_path / "bad.csv"
    pd.DataFrame(
        {
            "sepal length (cm)": [5.1, 4.9],
            "sepal width (cm)": [3.5, "abc"],
            "petal length (cm)": [1.4, 1.4],
            "petal width (cm)": [0.2, 0.2],
        }
    ).to_csv(csv, index=False)
    result = runner.invoke(app, ["predict", str(trained), str(csv)])
    assert result.exit_code == 4
    assert "sepal width (cm)" in result.stderr and "row 1" in result.stderr


def test_predict_missing_column_and_missing_bundle(trained: Path, tmp_path: Path) -> None:
    csv = tmp_path / "few.csv"
    pd.DataFrame({"sepal length (cm)": [5.1]}).to_csv(csv, index=False)
    result = runner.invoke(app, ["predict", str(trained), str(csv)])
    assert result.exit_code == 4 and "petal width (cm)" in result.stderr
    missing = runner.invoke(app, ["predict", str(tmp_path / "nothing"), str(csv)])
    assert missing.exit_code == 6 and "not found" in missing.stderr


def test_predict_and_evaluate_name_the_missing_input_argument(
    trained: Path, tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.csv")
    predicted = runner.invoke(app, ["predict", str(trained), missing])
    assert predicted.exit_code == 6
    assert f"input file not found: {missing}" in predicted.stderr.replace("\n", "")
    assert "data.source" not in predicted.stderr
    evaluated = runner.invoke(app, ["evaluate", str(trained), missing])
    assert evaluated.exit_code == 6 and "(field: data)" in evaluated.stderr
    assert "data.source" not in evaluated.stderr


def _model_in(out: Path) -> str:
    return str(json.loads((out / "kiln.json").read_text())["name"])


def test_train_replaces_its_own_bundle_but_not_another_models(tmp_path: Path) -> None:
    out = tmp_path / "models" / "m"
    fast = {"epochs": 2, "optimizer": {"name": "adam", "lr": 0.01}}
    first = _spec(tmp_path, train=fast)
    assert runner.invoke(app, ["train", str(first), "--out", str(out), "-q"]).exit_code == 0

    again = runner.invoke(app, ["train", str(first), "--out", str(out), "-q"])
    assert again.exit_code == 0, again.output
    assert "retraining 'iris-mlp'" in again.stderr

    other = _spec(tmp_path, name="iris-other", train=fast)
    refused = runner.invoke(app, ["train", str(other), "--out", str(out), "-q"])
    assert refused.exit_code == 12, refused.output  # ConflictError
    said = refused.stderr.replace("\n", " ")
    assert "'iris-mlp'" in said and "'iris-other'" in said and "--force" in said
    assert _model_in(out) == "iris-mlp"  # refused before training, nothing replaced

    forced = runner.invoke(app, ["train", str(other), "--out", str(out), "-q", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "replaces the one of 'iris-mlp'" in forced.stderr.replace("\n", " ")
    assert _model_in(out) == "iris-other"


def test_a_run_that_fails_on_its_data_gives_no_resume_hint(tmp_path: Path) -> None:
    spec = _spec(tmp_path, data={"source": "sklearn:iris", "target": "nope"})
    result = runner.invoke(app, ["train", str(spec), "--out", str(tmp_path / "m")])
    assert result.exit_code == 4, result.output
    assert "--resume" not in result.stderr and "checkpoints" not in result.stderr


def test_the_resume_hint_names_a_kept_checkpoint_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.train.callbacks import ResumeHint

    ckpt = tmp_path / ".m.ckpt"
    hint = ResumeHint(ckpt)
    hint.on_train_end({"error": "boom", "epochs_run": 0})  # failed before any checkpoint
    assert capsys.readouterr().err == ""
    ckpt.mkdir()
    (ckpt / "last.pt").write_bytes(b"a checkpoint")
    hint.on_train_end({"epochs_run": 3, "best_epoch": 3, "stopped_early": False, "seconds": 1})
    assert capsys.readouterr().err == ""  # finished: nothing to resume
    hint.on_train_end({"error": "diverged", "epochs_run": 2})
    assert capsys.readouterr().err == f"checkpoints: {ckpt} (continue with --resume)\n"


def test_resume_without_checkpoint_fails_cleanly(tmp_path: Path) -> None:
    args = ["train", str(_spec(tmp_path)), "--out", str(tmp_path / "m"), "-q", "--resume"]
    result = runner.invoke(app, args)
    assert result.exit_code == 7
    assert "nothing to resume" in result.stderr


def test_help_is_cheap_and_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from kiln.cli.main import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0 and 'train' in r.stdout, r.stdout\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.e2e
def test_console_script_runs_in_a_real_process(trained: Path) -> None:
    exe = Path(sys.executable).parent / "kiln"
    out = subprocess.run(
        [str(exe), "inspect", str(trained), "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["name"] == "iris-mlp"
    bad = subprocess.run([str(exe), "inspect", "/nonexistent/x"], capture_output=True, text=True)
    assert bad.returncode == 6
    assert "Traceback" not in bad.stderr


@pytest.mark.e2e
def test_ctrl_c_keeps_checkpoint_and_resume_finishes(tmp_path: Path) -> None:
    import signal

    spec = _spec(
        tmp_path, train={"epochs": 100, "batch_size": 2, "optimizer": {"name": "sgd", "lr": 0.01}}
    )
    out = tmp_path / "m"
    ckpt = tmp_path / ".m.ckpt" / "last.pt"
    exe = str(Path(sys.executable).parent / "kiln")
    proc = subprocess.Popen(
        [exe, "train", str(spec), "--out", str(out)],  # not -q: the resume hint shows
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job inherits SIGINT ignored, and Python then leaves it so:
        # give the child the default, as a terminal's foreground process has it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def written() -> bool:
        assert proc.poll() is None, "kiln train exited before it wrote a checkpoint"
        return ckpt.exists()

    wait_for(written, timeout=60, what="a checkpoint")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert f"checkpoints: {ckpt.parent} (continue with --resume)" in stderr
    assert ckpt.exists() and not out.exists()

    resumed = subprocess.run(
        [exe, "train", str(spec), "--out", str(out), "--json", "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    training = json.loads(resumed.stdout)["training"]
    assert training["resumed_from_epoch"] >= 1
    assert training["epochs_run"] == 100
    assert not ckpt.exists()
