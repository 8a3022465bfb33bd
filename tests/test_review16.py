"""Review of issue #16 (gradient-boosted trees): regressions found in review.

Crafted boosters are loaded in a child process: the tree libraries' native parsers
can abort or crash the whole process, which must never happen to a server. Each test
fails on the bug it names.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import kiln
from kiln.bundle import META_FILE, Bundle, sha256_file
from kiln.errors import BundleError, SpecError
from kiln.models.gbdt import GBDTModel
from kiln.spec.load import load_spec

ROWS = [{"x1": 0.3, "x2": 4.0, "color": "red"}, {"x1": None, "x2": 1.0, "color": None}]

# loads the bundle in argv[1] and predicts ROWS; prints BundleError or the predictions
LOAD = """
import json, sys
import kiln
from kiln.errors import BundleError
try:
    bundle = kiln.load(sys.argv[1])
except BundleError as exc:
    print("BundleError", exc.message)
    sys.exit(0)
print("loaded", json.dumps(bundle.predict(json.loads(sys.argv[2])).to_dict()))
"""


def table(task: str, n: int = 200, seed: int = 0) -> pd.DataFrame:
    """x1 (numeric, gaps), x2 (noise), color (string, gaps) and a label."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=n)
    color = rng.choice(["red", "green", "blue"], size=n).astype(object)
    signal = x1 + 1.5 * (color == "red") - 1.0 * (color == "blue")
    x1[::7] = np.nan
    color[::11] = None
    frame = pd.DataFrame({"x1": x1, "x2": rng.uniform(0, 10, size=n), "color": color})
    if task == "binary":
        frame["label"] = np.where(signal > 0.3, "yes", "no")
    else:
        frame["label"] = np.select([signal < -0.5, signal < 0.8], ["low", "mid"], "high")
    return frame


def spec(source: Path, library: str, **train: Any) -> dict[str, Any]:
    return {
        "name": "trees",
        "task": "classification",
        "data": {"source": str(source), "target": "label", "split": {"test": 0.2, "val": 0.2}},
        "model": {
            "type": "gbdt",
            "library": library,
            "n_estimators": 15,
            "num_leaves": 6,
            "min_child_samples": 5,
        },
        "train": {"seed": 0, **train},
    }


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """lightgbm/xgboost x binary/multiclass bundles, trained once."""
    root = tmp_path_factory.mktemp("review16")
    out: dict[str, Path] = {}
    for task in ("binary", "multiclass"):
        source = root / f"{task}.csv"
        table(task).to_csv(source, index=False)
        for library in ("lightgbm", "xgboost"):
            out[f"{library}-{task}"] = root / f"{library}-{task}"
            kiln.fit(spec(source, library), out=out[f"{library}-{task}"])
    return out


def crafted(
    tmp_path: Path, source: Path, name: str, mutate: Callable[[bytes], bytes], booster: str
) -> Path:
    """A copy of bundle ``source`` whose ``booster`` file is mutated and re-hashed (a
    crafted bundle passes the hash check)."""
    target = tmp_path / name
    target.mkdir()
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    path = target / booster
    path.write_bytes(mutate(path.read_bytes()))
    meta = json.loads((target / META_FILE).read_text())
    meta["files"][booster] = sha256_file(path)
    (target / META_FILE).write_text(json.dumps(meta))
    return target


def load_in_child(path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LOAD, str(path), json.dumps(ROWS)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def header(key: str, value: str) -> Callable[[bytes], bytes]:
    """LightGBM model text with header line ``key=`` set to ``value``."""
    pattern = rf"^{key}=.*$".encode()
    return lambda data: re.sub(pattern, f"{key}={value}".encode(), data, count=1, flags=re.M)


def first_tree(key: str, value: str) -> Callable[[bytes], bytes]:
    """LightGBM model text with Tree=0's ``key=`` line replaced."""

    def mutate(data: bytes) -> bytes:
        text = data.decode()
        start = text.index("\n" + key + "=", text.index("Tree=0"))
        end = text.index("\n", start + 1)
        return (text[:start] + f"\n{key}={value}" + text[end:]).encode()

    return mutate


def xgb_tree0(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    """An XGBoost model (saved as JSON, which load_model also reads) with tree 0
    changed."""

    def mutate(data: bytes) -> bytes:
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(bytearray(data))
        doc = json.loads(bytes(booster.save_raw(raw_format="json")))
        change(doc["learner"]["gradient_booster"]["model"]["trees"][0])
        return json.dumps(doc).encode()

    return mutate


# ---- FIXED: a booster whose class count is not the manifest's ------------------------


def test_a_lightgbm_booster_of_another_class_count_is_refused(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Was: a binary bundle whose booster says num_class=3 loaded and answered three
    probabilities (one NaN row) for two labels (models/gbdt.py load_booster)."""
    path = crafted(
        tmp_path, bundles["lightgbm-binary"], "c3", header("num_class", "3"), "booster.txt"
    )
    with pytest.raises(BundleError, match="num_class"):
        Bundle.load(path)


def test_a_swapped_multiclass_booster_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    """A 3-class booster with the same inputs in a binary bundle (either library)."""
    for library, booster in (("lightgbm", "booster.txt"), ("xgboost", "booster.json")):
        other = (bundles[f"{library}-multiclass"] / booster).read_bytes()

        def swap(_: bytes, replacement: bytes = other) -> bytes:
            return replacement

        path = crafted(tmp_path, bundles[f"{library}-binary"], f"swap-{library}", swap, booster)
        with pytest.raises(BundleError, match=r"trees per round|num_class"):
            Bundle.load(path)


def test_a_huge_lightgbm_class_count_is_refused_not_stalled(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Was: num_class=10^9 loaded, then predict stalled (allocating 10^9 outputs/row)."""
    path = crafted(
        tmp_path,
        bundles["lightgbm-binary"],
        "huge",
        header("num_class", "1000000000"),
        "booster.txt",
    )
    proc = load_in_child(path, timeout=60)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.startswith("BundleError"), proc.stdout


def test_good_bundles_still_load_and_predict(bundles: dict[str, Path]) -> None:
    for path in bundles.values():
        bundle = Bundle.load(path)
        out = bundle.predict(ROWS).to_dict()
        labels, probabilities = out["labels"], out["probabilities"]
        assert isinstance(labels, list) and isinstance(probabilities, list)
        assert len(probabilities) == 2
        assert all(isinstance(p, list) and len(p) == len(labels) for p in probabilities)


# ---- FIXED: crafted trees crashed the loading process (booster_check) ----------------


def test_a_lightgbm_tree_of_the_wrong_size_is_a_bundle_error(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """One changed tree line (its tree_sizes entry now wrong): LightGBM's parallel
    parser throws inside OpenMP and the process dies with 'terminate called'."""
    path = crafted(
        tmp_path,
        bundles["lightgbm-binary"],
        "size",
        first_tree("shrinkage", "1.000000"),  # same meaning, other size
        "booster.txt",
    )
    proc = load_in_child(path)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-300:]}"
    assert proc.stdout.startswith("BundleError"), proc.stdout


def test_a_lightgbm_child_out_of_range_is_a_bundle_error(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """tree_sizes removed (LightGBM then parses tree by tree) and a child index past
    the tree: predict reads out of bounds (SIGSEGV)."""

    def mutate(data: bytes) -> bytes:
        children = re.search(rb"Tree=0\n(?:.*\n)*?left_child=(.*)\n", data)
        assert children is not None
        far = ["200", *children.group(1).decode().split()[1:]]
        text = first_tree("left_child", " ".join(far))(data)
        return re.sub(rb"^tree_sizes=.*\n", b"", text, count=1, flags=re.M)

    path = crafted(tmp_path, bundles["lightgbm-binary"], "child", mutate, "booster.txt")
    proc = load_in_child(path)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-300:]}"
    assert proc.stdout.startswith("BundleError"), proc.stdout


def test_an_xgboost_child_out_of_range_is_a_bundle_error(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    def far(tree: dict[str, Any]) -> None:
        tree["left_children"][0] = 10**6

    path = crafted(tmp_path, bundles["xgboost-binary"], "xchild", xgb_tree0(far), "booster.json")
    proc = load_in_child(path)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-300:]}"
    assert proc.stdout.startswith("BundleError"), proc.stdout


def test_a_huge_xgboost_class_count_is_refused_not_stalled(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """num_features()/save_config() configure the learner, which stalls on a crafted
    num_class; it must be read from the JSON before XGBoost sees it."""

    def mutate(data: bytes) -> bytes:
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(bytearray(data))
        doc = json.loads(bytes(booster.save_raw(raw_format="json")))
        doc["learner"]["learner_model_param"]["num_class"] = "1000000000"
        return json.dumps(doc).encode()

    path = crafted(tmp_path, bundles["xgboost-binary"], "xhuge", mutate, "booster.json")
    try:
        proc = load_in_child(path, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("loading stalled")
    assert proc.stdout.startswith("BundleError"), proc.stdout


# ---- FIXED: the lineage spec of a gbdt bundle trains what the bundle is -------------


def test_the_lineage_spec_names_the_native_preprocessing(bundles: dict[str, Path]) -> None:
    """Was: lineage.spec held data.preprocessing's raw defaults (mean, onehot,
    standard), so the recorded 'full spec' re-trained a different (imputed, one-hot)
    model (workflow._lineage)."""
    meta = json.loads((bundles["lightgbm-binary"] / META_FILE).read_text())
    recorded = load_spec(meta["lineage"]["spec"])
    pre = recorded.preprocessing
    assert (pre.missing, pre.categorical, pre.scale) == ("native", "native", "none")
    features = json.loads((bundles["lightgbm-binary"] / "preprocess.json").read_text())
    assert {f["name"]: f.get("encoding") for f in features["features"]}["color"] == "native"


# ---- FIXED: settings gbdt ignores are refused, not silently dropped -----------------


@pytest.mark.parametrize(
    "stopping",
    [
        {"metric": "val_loss", "patience": 3, "folds": 3},
        {"metric": "val_loss", "patience": 3, "smoothing": 0.5},
    ],
)
def test_gbdt_refuses_early_stopping_settings_it_does_not_apply(
    tmp_path: Path, stopping: dict[str, Any]
) -> None:
    """Was: train.early_stopping.folds: 3 (k-fold early stopping) and an explicit
    smoothing weight were accepted for gbdt and silently ignored (boosting stops on
    the raw validation value; recipe.train_frames branches to trees first)."""
    source = tmp_path / "t.csv"
    table("binary").to_csv(source, index=False)
    with pytest.raises((SpecError, ValueError), match="early_stopping"):
        load_spec(spec(source, "lightgbm", early_stopping=stopping))


# ---- FIXED: k-fold early stopping under an epoch-spread learning-rate schedule ------


def wine(schedule: dict[str, Any], folds: Any) -> dict[str, Any]:
    """178 rows, 3 classes; the default split leaves 18 validation rows."""
    return {
        "name": "wine",
        "task": "classification",
        "data": {"source": "sklearn:wine", "target": "target"},
        "model": {"type": "mlp", "hidden": [8]},
        "train": {
            "epochs": 12,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
            "lr_schedule": schedule,
            "early_stopping": {"metric": "val_loss", "patience": 3, "folds": folds},
        },
    }


@pytest.mark.parametrize("schedule", [{"name": "cosine"}, {"name": "none", "warmup": 0.2}])
def test_kfold_epochs_are_not_copied_into_another_learning_rate_curve(
    schedule: dict[str, Any],
) -> None:
    """Was: the folds ran cosine (or warmup) over train.epochs, and the final fit ran it
    over the chosen epoch count: a fully decayed run of what the folds saw at a high
    learning rate (train_kfold; kfold_folds now stops on the validation split)."""
    from kiln.train.early_stopping import kfold_folds

    table_rows = pd.DataFrame({"target": [0, 1, 2] * 20})
    for folds in ("auto", 3):
        parsed = load_spec(wine(schedule, folds))
        assert kfold_folds(parsed, table_rows, table_rows.iloc[:18]) is None
    plain = load_spec(wine({"name": "step", "step_epochs": 5}, 3))
    assert kfold_folds(plain, table_rows, table_rows.iloc[:18]) == 3  # step: per epoch


# ---- FIXED: an xgboost lineage spec trains the same booster again --------------------


def test_an_xgboost_lineage_spec_boosts_with_the_same_parameters(
    bundles: dict[str, Path],
) -> None:
    """Was: lineage.spec dumped every GBDTSpec default, so on reload num_leaves and
    min_child_samples counted as set and xgboost got max_leaves=31 and
    min_child_weight=20 where the bundle had been boosted with 0 and 1."""
    from kiln.models.registry import build
    from kiln.train.boosting import Problem, _xgboost_params

    meta = json.loads((bundles["xgboost-binary"] / META_FILE).read_text())
    recorded = load_spec(meta["lineage"]["spec"])
    original = load_spec(spec(Path("t.csv"), "xgboost"))
    problem = Problem(task="classification", classes=2, loss="cross_entropy")

    def params(s: Any) -> dict[str, Any]:
        model = build(s.model, 3, 2, task="classification")
        assert isinstance(model, GBDTModel)
        return _xgboost_params(model, s.train, problem)

    assert params(recorded) == params(original)


# ---- FIXED: train.early_stopping.restore_best: false keeps every round ---------------


def test_gbdt_restore_best_false_keeps_the_last_round(tmp_path: Path) -> None:
    """Was: boosting always cut the booster back to the best round, ignoring
    restore_best: false (boosting.fit_gbdt)."""
    source = tmp_path / "t.csv"
    table("binary").to_csv(source, index=False)
    doc = spec(source, "lightgbm", early_stopping={"metric": "val_loss", "patience": 2})
    doc["model"].update(n_estimators=200, learning_rate=0.5)  # overfits: stops early
    kept = kiln.fit(doc, out=tmp_path / "best")
    doc["train"]["early_stopping"]["restore_best"] = False
    last = kiln.fit(doc, out=tmp_path / "last")
    assert isinstance(kept, Bundle) and isinstance(last, Bundle)
    assert isinstance(kept.model, GBDTModel) and isinstance(last.model, GBDTModel)
    record = last.meta.training
    assert record.stopped_early and record.best_epoch is not None
    assert record.best_epoch < record.epochs_run
    assert kept.model.summary().rounds == record.best_epoch
    assert last.model.summary().rounds == record.epochs_run


# ---- FIXED: an inconsistent model_context is a BundleError at load -------------------


@pytest.mark.parametrize(
    "context",
    [
        {"feature_names": ["x1"]},  # was: IndexError in summary() (dashboard, jobs)
        {"categorical": [7]},
        {"task": "generation"},
    ],
)
def test_an_inconsistent_tree_model_context_is_refused(
    bundles: dict[str, Path], tmp_path: Path, context: dict[str, Any]
) -> None:
    target = tmp_path / "ctx"
    target.mkdir()
    for item in bundles["lightgbm-binary"].iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    meta = json.loads((target / META_FILE).read_text())
    meta["model_context"].update(context)
    (target / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="describes no valid model"):
        Bundle.load(target)
