"""A gbdt bundle served over real HTTP: REST /predict and KServe v2 infer answer as
``Bundle.predict`` does, nulls and unseen categories included, on the backend chosen
by measurement (the booster's predictor or onnxruntime on a checked export).

One tiny LightGBM model is trained here on a table made here (two numbers with gaps, a
colour with gaps), registered on a fresh platform and deployed three times: ``auto``,
``torch`` (for trees: the booster's own predictor) and ``onnx``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from serve_support import bearer

from support import serve_app

API = "/api/v1"
NAME = "trees"
DEPLOYMENTS = {"trees-auto": "auto", "trees-native": "torch", "trees-onnx": "onnx"}

# a null number, a null category, an unseen category, both numbers null, none missing
ROWS: list[dict[str, Any]] = [
    {"a": None, "b": 0.3, "color": "red"},
    {"a": 0.7, "b": -1.2, "color": None},
    {"a": 0.2, "b": 1.5, "color": "purple"},
    {"a": None, "b": None, "color": "green"},
    {"a": -0.4, "b": 0.1, "color": "blue"},
]


def table(n: int = 240) -> pd.DataFrame:
    """Two numbers and a colour decide the class; some of each are missing."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=n), rng.normal(size=n)
    color = rng.choice(["red", "green", "blue"], size=n)
    frame = pd.DataFrame({"a": a, "b": b, "color": color.astype(object)})
    frame["target"] = ((a + b + 1.5 * (color == "red")) > 0.5).astype(int)
    frame.loc[::7, "a"] = np.nan
    frame.loc[3::11, "color"] = None
    return frame


def spec(source: Path) -> dict[str, Any]:
    return {
        "name": NAME,
        "task": "classification",
        "data": {"source": str(source), "target": "target"},
        "model": {"type": "gbdt", "n_estimators": 30, "num_leaves": 7, "min_child_samples": 5},
    }


@dataclass
class Served:
    url: str
    key: str
    bundle: Any  # the kiln.Bundle registered as version 1

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=bearer(self.key), timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    import kiln
    from kiln.app import build_services, create_app
    from kiln.server import bootstrap
    from kiln.settings import Settings
    from kiln.standalone import register

    root = tmp_path_factory.mktemp("gbdt-serving")
    source = root / "gaps.csv"
    table().to_csv(source, index=False)
    settings = Settings(home=root / "home")
    services = build_services(settings)
    key = bootstrap(services)
    assert key is not None
    out = root / "bundles" / NAME
    bundle = kiln.fit(spec(source), out=out)
    register(services, out, bundle.meta, NAME)
    try:
        with serve_app(create_app(settings, services=services)) as url:
            live = Served(url, key, bundle)
            with live.client() as http:
                for name, backend in DEPLOYMENTS.items():
                    body = {"name": name, "model": NAME, "version": 1, "backend": backend}
                    r = http.post(f"{API}/deployments", json=body)
                    assert r.status_code == 201, r.text
            yield live
    finally:
        services.db.dispose()


def test_the_bundle_is_a_tree_model_that_accepts_missing_values(served: Served) -> None:
    from kiln.models.gbdt import GBDTModel

    assert isinstance(served.bundle.model, GBDTModel)
    assert served.bundle.model.categorical == [2]  # color: native category codes
    features = served.bundle.preprocessor.state.features
    assert all(f.accepts_missing for f in features)


def test_each_deployment_reports_the_backend_it_runs(served: Served) -> None:
    with served.client() as http:
        backends = {}
        for name in DEPLOYMENTS:
            r = http.get(f"{API}/deployments/{name}")
            assert r.status_code == 200, r.text
            backends[name] = r.json()["routes"][0]["backend"]
            meta = http.get(f"/v2/models/{name}")
            assert meta.json()["platform"] == f"kiln-{backends[name]}"
    assert backends["trees-native"] == "lightgbm"  # torch: the booster's own predictor
    assert backends["trees-onnx"] == "onnxruntime"
    assert backends["trees-auto"] in ("lightgbm", "onnxruntime")  # whichever measured faster


@pytest.mark.parametrize("name", list(DEPLOYMENTS))
def test_rest_predict_with_nulls_and_an_unseen_category(served: Served, name: str) -> None:
    expected = served.bundle.predict(ROWS)
    with served.client() as http:
        r = http.post(f"{API}/deployments/{name}/predict", json={"inputs": ROWS})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == expected.predictions
    np.testing.assert_allclose(r.json()["probabilities"], expected.probabilities, atol=1e-5)


def test_missing_and_unseen_mean_what_the_trees_make_of_them(served: Served) -> None:
    """An unseen category is a missing one (NaN code): the same answer as null."""
    unseen = dict(ROWS[2], color="purple")
    missing = dict(ROWS[2], color=None)
    with served.client() as http:
        r = http.post(f"{API}/deployments/trees-onnx/predict", json={"inputs": [unseen, missing]})
    assert r.status_code == 200, r.text
    first, second = r.json()["probabilities"]
    assert first == pytest.approx(second)


@pytest.mark.parametrize("name", list(DEPLOYMENTS))
def test_v2_infer_with_a_null_and_an_unseen_category(served: Served, name: str) -> None:
    expected = served.bundle.predict(ROWS)
    inputs = [
        {"name": c, "shape": [len(ROWS)], "datatype": dtype, "data": [r[c] for r in ROWS]}
        for c, dtype in (("a", "FP32"), ("b", "FP64"), ("color", "BYTES"))
    ]
    with served.client() as http:
        r = http.post(f"/v2/models/{name}/infer", json={"inputs": inputs})
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert list(outputs["predictions"]["data"]) == expected.predictions
    proba = np.asarray(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    np.testing.assert_allclose(proba, expected.probabilities, atol=1e-5)


# ---- the tree runtime under the server ----------------------------------------------


def fit_table(frame: pd.DataFrame, path: Path, target: str, task: str, library: str) -> Any:
    import kiln

    frame.to_csv(path, index=False)
    model: dict[str, Any] = {"type": "gbdt", "library": library, "n_estimators": 20}
    return kiln.fit(
        {
            "name": f"{library}-{task}",
            "task": task,
            "data": {"source": str(path), "target": target},
            "model": {**model, "num_leaves": 7, "min_child_samples": 5},
        }
    )


@pytest.mark.parametrize(
    ("library", "task"),
    [("xgboost", "classification"), ("lightgbm", "regression"), ("xgboost", "regression")],
)
def test_exports_agree_with_the_booster_on_gaps_and_many_categories(
    tmp_path: Path, library: str, task: str
) -> None:
    """Ten categories make partition splits (not one-hot ones); a fifth of every
    column is missing in the parity rows, and one row is missing everywhere."""
    import onnx

    from kiln.runtime.onnx import OnnxBackend
    from kiln.runtime.trees import check_tree_parity, export_trees, tree_samples

    rng = np.random.default_rng(2)
    n = 400
    letter = rng.choice(list("abcdefghij"), n)
    a = rng.normal(size=n)
    frame = pd.DataFrame({"a": a, "letter": letter.astype(object)})
    frame["y"] = np.isin(letter, list("acegi")) + (a > 0.5) + 0.1 * rng.normal(size=n)
    if task == "classification":
        frame["y"] = (frame["y"] > 0.9).astype(int)
    frame.loc[::5, "a"] = np.nan
    bundle = fit_table(frame, tmp_path / "t.csv", "y", task, library)
    samples = tree_samples(bundle.preprocessor.state.features, 256)
    assert np.isnan(samples).any() and np.isnan(samples[0]).all()
    graph = export_trees(bundle.model)
    shaped = onnx.load_from_string(graph).graph
    assert [i.name for i in shaped.input] == ["input"]
    assert [o.name for o in shaped.output] == ["output"]
    assert check_tree_parity(bundle.model, graph, samples) < 1e-4
    out = OnnxBackend(graph).forward(samples)
    assert out.shape == (256, bundle.meta.n_outputs)
    if task == "regression":  # the value itself, in the booster's units
        np.testing.assert_allclose(out, bundle.model.predict_raw(samples), atol=1e-4)


def test_an_export_that_disagrees_is_never_served(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real but wrong graph (another booster's): parity refuses it; auto falls back to
    the booster's predictor, onnx is a SpecError naming backend."""
    from kiln.errors import ExportError, SpecError
    from kiln.runtime import trees
    from kiln.runtime.select import select_backend
    from kiln.runtime.trees import check_tree_parity, export_trees, tree_samples

    frame = table()
    frame["target"] = 1 - frame["target"]  # the opposite model
    other = fit_table(frame, tmp_path / "other.csv", "target", "classification", "lightgbm")
    wrong = export_trees(other.model)
    model = served.bundle.model
    samples = tree_samples(served.bundle.preprocessor.state.features)
    with pytest.raises(ExportError, match="disagrees"):
        check_tree_parity(model, wrong, samples)

    monkeypatch.setattr(trees, "export_trees", lambda _model: wrong)
    runtime = served.bundle.meta.runtime
    example = served.bundle.example_input()
    auto = select_backend(model, runtime, "auto", onnx=None, example=example, samples=samples)
    assert auto.backend.name == "lightgbm" and auto.parity is None
    with pytest.raises(SpecError) as caught:
        select_backend(model, runtime, "onnx", onnx=None, example=example, samples=samples)
    assert caught.value.field == "backend" and "disagrees" in caught.value.message


def test_the_choice_is_measured_and_recorded(served: Served) -> None:
    from kiln.runtime.trees import choose_tree_backend, tree_samples

    samples = tree_samples(served.bundle.preprocessor.state.features)
    selection = choose_tree_backend(served.bundle.model, samples)
    assert selection.timings is not None
    assert set(selection.timings) == {"lightgbm", "onnxruntime"}
    for times in selection.timings.values():
        assert set(times) == {1, 256} and all(t > 0 for t in times.values())
    native, ort = selection.timings["lightgbm"], selection.timings["onnxruntime"]
    faster = "onnxruntime" if (ort[1] / native[1]) * (ort[256] / native[256]) < 1 else "lightgbm"
    assert selection.backend.name == faster
    assert selection.parity is not None and selection.parity < 1e-4
    assert np.isfinite(selection.backend.forward(samples)).all()  # NaN rows included
