"""Tables: kiln gbdt and ``model.type: auto`` against scikit-learn on the same splits.

For wine, breast_cancer, digits, diabetes and a larger synthetic table (sklearn's
``make_classification``: 100,000 rows, 20 informative numeric columns with some
missing values, plus 3 string categorical columns that carry signal), written to a
temporary CSV, this trains

- kiln ``gbdt`` (LightGBM, the GBDTSpec defaults) and kiln ``auto`` via ``kiln.fit``;
- scikit-learn's HistGradientBoosting{Classifier,Regressor} (native NaN and
  categorical support) and LogisticRegression / Ridge (mean-imputed, scaled,
  one-hot), on the same non-test rows kiln learns from (its training plus
  validation rows: kiln uses the validation rows for early stopping and selection),

and scores every contender on exactly the rows of kiln's holdout test split
(``kiln.data.split.holdout`` with the spec's split). It prints held-out accuracy or
R² in points (x100), training seconds and the median 1-row predict latency over
200 calls (kiln: ``Bundle.predict`` of one dict row; scikit-learn: ``predict`` of a
one-row frame), as a Rich table and one JSON line. Targets (issue #16): kiln gbdt
within 0.5 points of HistGradientBoosting on every table; auto never more than 1
point below the best scikit-learn baseline.

    python benchmarks/tabular.py            # full run (several minutes on 2 cores)
    python benchmarks/tabular.py --quick    # the synthetic table at 10,000 rows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd

LATENCY_CALLS = 200
GBDT_TARGET = 0.5  # points kiln gbdt may trail HistGradientBoosting
AUTO_TARGET = 1.0  # points auto may trail the best scikit-learn baseline


@dataclass
class Result:
    """One contender on one table: held-out score in points, seconds, latency."""

    table: str
    contender: str
    metric: str
    points: float
    train_s: float
    latency_ms: float
    note: str = ""


@dataclass(frozen=True)
class Case:
    """A table to benchmark: kiln's data source and task."""

    name: str
    source: str
    task: str


def synthetic_table(rows: int, path: Path, seed: int = 0) -> Path:
    """The larger table: 20 informative numeric columns (5% missing each) and 3
    categorical string columns derived from further informative features (so they
    carry signal, and the trees must split on them), written to ``path`` as CSV."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=rows,
        n_features=26,
        n_informative=23,
        n_redundant=0,
        n_classes=3,
        n_clusters_per_class=2,
        class_sep=0.8,
        flip_y=0.02,
        random_state=seed,
    )
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(x[:, :20], columns=[f"x{i}" for i in range(20)])
    frame = frame.mask(rng.random(frame.shape) < 0.05)
    for j, levels in enumerate((4, 8, 16)):
        # a quantile bucket of an informative feature, named as a string level
        codes = pd.qcut(x[:, 20 + j], levels, labels=False)
        frame[f"c{j}"] = [f"level_{c}" for c in codes]
    frame["target"] = [f"class_{v}" for v in y]
    frame.to_csv(path, index=False)
    return path


def kiln_spec(case: Case, model: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"bench-{case.name}",
        "task": case.task,
        "data": {"source": case.source, "target": "target"},
        "model": model,
        "train": {"device": "cpu"},
    }


def splits(case: Case) -> tuple[pd.DataFrame, pd.DataFrame]:
    """kiln's holdout split of the table: (non-test rows, test rows), as kiln.fit makes it."""
    from kiln.data.split import holdout
    from kiln.spec import load_spec
    from kiln.train.recipe import load_table

    spec = load_spec(kiln_spec(case, {"type": "gbdt"}))
    table = load_table(spec)
    stratify = spec.task == "classification" and spec.data.split.stratify
    parts = holdout(table.frame["target"], spec.data.split, stratify)
    learn = np.sort(np.concatenate([parts.train, parts.val]))
    return table.frame.iloc[learn], table.frame.iloc[parts.test]


def median_ms(call: Callable[[], object]) -> float:
    call()  # warm-up (lazy backend choice, caches)
    times = []
    for _ in range(LATENCY_CALLS):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def run_kiln(case: Case, model: dict[str, Any], label: str, test: pd.DataFrame) -> Result:
    import kiln
    from kiln.bundle import Bundle
    from kiln.evaluate.metrics import metric_value

    metric = "accuracy" if case.task == "classification" else "r2"
    started = time.perf_counter()
    bundle = kiln.fit(kiln_spec(case, model))
    seconds = time.perf_counter() - started
    assert isinstance(bundle, Bundle)
    points = 100 * metric_value(bundle.meta.metrics["test"], metric)
    row = test.drop(columns=["target"]).iloc[0].to_dict()
    row = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
    latency = median_ms(lambda: bundle.predict([row]))
    note = ""
    selection = bundle.meta.training.selection
    if selection is not None:
        scores = ", ".join(f"{c.type} {100 * c.score:.1f}" for c in selection.candidates)
        note = f"{selection.method}: {scores} -> {selection.winner}"
    elif bundle.meta.training.best_epoch is not None:
        note = f"best round {bundle.meta.training.best_epoch}"
    return Result(case.name, label, metric, points, seconds, latency, note)


def sklearn_models(task: str, frame: pd.DataFrame) -> dict[str, Any]:
    """HistGradientBoosting (native categories and NaN) and the linear baseline."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    cats = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    nums = [c for c in frame.columns if c not in cats]
    prep = ColumnTransformer(
        [
            ("num", make_pipeline(SimpleImputer(), StandardScaler()), nums),
            ("cat", OneHotEncoder(handle_unknown="ignore"), cats),
        ]
    )
    if task == "classification":
        hgb: Any = HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=0)
        linear: Any = LogisticRegression(max_iter=5000)
        return {"sklearn HGB": hgb, "sklearn LR": make_pipeline(prep, linear)}
    hgb = HistGradientBoostingRegressor(categorical_features="from_dtype", random_state=0)
    return {"sklearn HGB": hgb, "sklearn Ridge": make_pipeline(prep, Ridge())}


def run_sklearn(case: Case, learn: pd.DataFrame, test: pd.DataFrame) -> list[Result]:
    from sklearn.metrics import accuracy_score, r2_score

    x, y = learn.drop(columns=["target"]), learn["target"]
    x_test, y_test = test.drop(columns=["target"]), test["target"]
    cats = [c for c in x.columns if not pd.api.types.is_numeric_dtype(x[c])]
    typed = {c: pd.CategoricalDtype(sorted(x[c].dropna().unique())) for c in cats}
    out = []
    for label, model in sklearn_models(case.task, x).items():
        fit_x, test_x = x, x_test
        if "HGB" in label:  # category dtype: HGB's own categorical splits
            fit_x, test_x = x.astype(typed), x_test.astype(typed)
        started = time.perf_counter()
        model.fit(fit_x, y)
        seconds = time.perf_counter() - started
        pred = model.predict(test_x)
        if case.task == "classification":
            metric, points = "accuracy", 100 * accuracy_score(y_test, pred)
        else:
            metric, points = "r2", 100 * r2_score(y_test, pred)
        latency = median_ms(partial(model.predict, test_x.iloc[:1]))
        out.append(Result(case.name, label, metric, points, seconds, latency))
    return out


def verdicts(results: list[Result]) -> dict[str, dict[str, bool | float]]:
    """Per table: kiln gbdt - HGB and auto - best sklearn, in points, and the targets."""
    out: dict[str, dict[str, bool | float]] = {}
    for table in dict.fromkeys(r.table for r in results):
        rows = {r.contender: r.points for r in results if r.table == table}
        gbdt_gap = rows["kiln gbdt"] - rows["sklearn HGB"]
        best_sklearn = max(v for k, v in rows.items() if k.startswith("sklearn"))
        auto_gap = rows["kiln auto"] - best_sklearn
        out[table] = {
            "gbdt_minus_hgb": round(gbdt_gap, 2),
            "gbdt_target_met": gbdt_gap >= -GBDT_TARGET,
            "auto_minus_best_sklearn": round(auto_gap, 2),
            "auto_target_met": auto_gap >= -AUTO_TARGET,
        }
    return out


def render(results: list[Result], verdict: dict[str, dict[str, bool | float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="held-out score (points), training and 1-row latency", title_justify="left")
    for col in ("table", "contender", "metric", "points", "train s", "1-row ms", "note"):
        table.add_column(
            col, justify="right" if col in ("points", "train s", "1-row ms") else "left"
        )
    for r in results:
        table.add_row(
            r.table,
            r.contender,
            r.metric,
            f"{r.points:.2f}",
            f"{r.train_s:.2f}",
            f"{r.latency_ms:.3f}",
            r.note,
        )
    console = Console(width=None if sys.stdout.isatty() else 140)  # notes on one line in logs
    console.print(table)
    for name, v in verdict.items():
        console.print(
            f"{name}: gbdt - HGB {v['gbdt_minus_hgb']:+.2f} "
            f"({'met' if v['gbdt_target_met'] else 'MISSED'}), auto - best sklearn "
            f"{v['auto_minus_best_sklearn']:+.2f} ({'met' if v['auto_target_met'] else 'MISSED'})",
            highlight=False,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="synthetic table at 10,000 rows")
    parser.add_argument("--rows", type=int, default=None, help="synthetic table rows")
    parser.add_argument("--only", nargs="*", default=None, help="table names to run")
    args = parser.parse_args(argv)
    rows = args.rows or (10_000 if args.quick else 100_000)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        synth = synthetic_table(rows, Path(tmp) / "synthetic.csv")
        cases = [
            Case("wine", "sklearn:wine", "classification"),
            Case("breast_cancer", "sklearn:breast_cancer", "classification"),
            Case("digits", "sklearn:digits", "classification"),
            Case("diabetes", "sklearn:diabetes", "regression"),
            Case(f"synthetic_{rows // 1000}k", str(synth), "classification"),
        ]
        for case in cases:
            if args.only and case.name not in args.only:
                continue
            learn, test = splits(case)
            results.append(run_kiln(case, {"type": "gbdt"}, "kiln gbdt", test))
            results.extend(run_sklearn(case, learn, test))
            results.append(run_kiln(case, {"type": "auto"}, "kiln auto", test))
            print(f"done: {case.name}", file=sys.stderr)
    verdict = verdicts(results)
    render(results, verdict)
    print(json.dumps({"results": [asdict(r) for r in results], "targets": verdict}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
