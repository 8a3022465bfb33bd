"""Missing values over HTTP mean what they mean to ``Bundle.predict``.

Tiny models are trained here on a table made here (numbers and a category, with gaps),
once with ``missing: mean`` (imputed: the category takes its mode) and once with
``missing: drop`` (refused), registered on a fresh platform and served over real HTTP.
A ``null`` over REST, ``null`` in a KServe v2 tensor's JSON data, or NaN in a binary
FP32 tensor gives the very predictions ``Bundle.predict`` gives for None/NaN; where the
model drops missing values, the answer is a 422 naming the row and column.
"""

from __future__ import annotations

import json
import struct
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
NUMBERS = ["a", "b"]
MIXED = ["a", "b", "color"]


def table(n: int = 90) -> pd.DataFrame:
    """Two numbers and a colour decide the class; a few of each are missing."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=n), rng.normal(size=n)
    color = rng.choice(["red", "green", "blue"], size=n)
    frame = pd.DataFrame({"a": a, "b": b, "color": color.astype(object)})
    frame["target"] = ((a + b + (color == "red")) > 0.5).astype(int)
    frame.loc[::9, "a"] = np.nan
    frame.loc[4::11, "color"] = None
    return frame


def spec(name: str, source: Path, features: list[str], missing: str) -> dict[str, Any]:
    return {
        "name": name,
        "task": "classification",
        "data": {
            "source": str(source),
            "target": "target",
            "features": features,
            "preprocessing": {"missing": missing},
        },
        "model": {"type": "linear"},
        "train": {"epochs": 4, "batch_size": 16, "device": "cpu"},
    }


MODELS = {  # name: (features, missing)
    "numbers-mean": (NUMBERS, "mean"),
    "mixed-mean": (MIXED, "mean"),
    "numbers-drop": (NUMBERS, "drop"),
    "mixed-drop": (MIXED, "drop"),
}

# rows with gaps: a null number, a null category, both, none
GAPPY: list[dict[str, Any]] = [
    {"a": None, "b": 0.3, "color": "red"},
    {"a": 0.7, "b": -1.2, "color": None},
    {"a": None, "b": 1.5, "color": None},
    {"a": -0.4, "b": 0.1, "color": "blue"},
]


def numbers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: row[k] for k in NUMBERS} for row in rows]


@dataclass
class Served:
    url: str
    key: str
    bundles: dict[str, Any]  # name -> the kiln.Bundle registered as version 1

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=bearer(self.key), timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    import kiln
    from kiln.app import build_services, create_app
    from kiln.server import bootstrap
    from kiln.settings import Settings
    from kiln.standalone import register

    root = tmp_path_factory.mktemp("missing")
    source = root / "gaps.csv"
    table().to_csv(source, index=False)
    bundles = {}
    settings = Settings(home=root / "home", prediction_log_sample=1.0)  # every request
    services = build_services(settings)
    key = bootstrap(services)
    assert key is not None
    for name, (features, missing) in MODELS.items():
        out = root / "bundles" / name
        bundles[name] = kiln.fit(spec(name, source, features, missing), out=out)
        register(services, out, bundles[name].meta, name)
    try:
        with serve_app(create_app(settings, services=services)) as url:
            live = Served(url, key, bundles)
            with live.client() as http:
                for name in MODELS:
                    body = {"name": name, "model": name, "version": 1}
                    r = http.post(f"{API}/deployments", json=body)
                    assert r.status_code == 201, r.text
            yield live
    finally:
        services.db.dispose()


def rest(http: httpx.Client, name: str, rows: list[dict[str, Any]]) -> httpx.Response:
    return http.post(f"{API}/deployments/{name}/predict", json={"inputs": rows})


def infer(http: httpx.Client, name: str, inputs: list[dict[str, Any]]) -> httpx.Response:
    return http.post(f"/v2/models/{name}/infer", json={"inputs": inputs})


def v2_predictions(r: httpx.Response) -> list[Any]:
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    return list(outputs["predictions"]["data"])


def probabilities(r: httpx.Response) -> np.ndarray:
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    return np.asarray(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])


def test_null_over_rest_is_imputed_as_bundle_predict_imputes(served: Served) -> None:
    with served.client() as http:
        for name, rows in (("mixed-mean", GAPPY), ("numbers-mean", numbers(GAPPY))):
            bundle = served.bundles[name]
            with_none = bundle.predict(rows)
            with_nan = bundle.predict(pd.DataFrame(rows).astype({"a": float, "b": float}))
            assert with_none.predictions == with_nan.predictions
            r = rest(http, name, rows)
            assert r.status_code == 200, r.text
            assert r.json()["predictions"] == with_none.predictions, name
            np.testing.assert_allclose(
                r.json()["probabilities"], with_none.probabilities, atol=1e-6
            )
            # imputed, not ignored: a null answers as the column's fill value does
            fill = bundle.preprocessor.state.features[0].fill
            filled = [dict(row, a=fill if row["a"] is None else row["a"]) for row in rows]
            assert rest(http, name, filled).json()["probabilities"] == r.json()["probabilities"]


def test_null_in_a_v2_tensor_is_imputed(served: Served) -> None:
    rows = numbers(GAPPY)
    expected = served.bundles["numbers-mean"].predict(rows)
    matrix = [[row[c] for c in NUMBERS] for row in rows]
    tensor = {"name": "input", "shape": [len(rows), 2], "datatype": "FP32", "data": matrix}
    with served.client() as http:
        r = infer(http, "numbers-mean", [tensor])
        assert v2_predictions(r) == expected.predictions
        np.testing.assert_allclose(probabilities(r), expected.probabilities, atol=1e-6)

        # one tensor per column: null in FP32 data and in BYTES data alike
        mixed = served.bundles["mixed-mean"].predict(GAPPY)
        columns = [
            {"name": c, "shape": [len(GAPPY)], "datatype": dtype, "data": [r[c] for r in GAPPY]}
            for c, dtype in (("a", "FP32"), ("b", "FP64"), ("color", "BYTES"))
        ]
        assert v2_predictions(infer(http, "mixed-mean", columns)) == mixed.predictions


def test_nan_in_a_binary_fp32_tensor_is_a_missing_value(served: Served) -> None:
    rows = numbers(GAPPY)
    values = np.array([[np.nan if v is None else v for v in r.values()] for r in rows], np.float32)
    expected = served.bundles["numbers-mean"].predict(values.astype(np.float64))
    raw = values.tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": list(values.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    head = json.dumps(header).encode()
    with served.client() as http:
        r = http.post(
            "/v2/models/numbers-mean/infer",
            content=head + raw,
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
        assert v2_predictions(r) == expected.predictions
        # the same tensor to a model that drops missing values: refused, row and column named
        r = http.post(
            "/v2/models/numbers-drop/infer",
            content=head + raw,
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
        assert r.status_code == 422, r.text
        assert "input[0].a" in r.json()["error"] and "missing" in r.json()["error"]
        # a binary column tensor too (NaN of FP32 data, per column)
        column = struct.pack("<4f", 0.1, float("nan"), -0.3, 1.0)
        head = json.dumps(
            {
                "inputs": [
                    {"name": "a", "shape": [4], "datatype": "FP32", "data": [0.5] * 4},
                    {
                        "name": "b",
                        "shape": [4],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(column)},
                    },
                ]
            }
        ).encode()
        r = http.post(
            "/v2/models/numbers-mean/infer",
            content=head + column,
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
        b = list(np.frombuffer(column, np.float32).astype(np.float64))
        expected = served.bundles["numbers-mean"].predict([{"a": 0.5, "b": v} for v in b])
        assert v2_predictions(r) == expected.predictions


def test_null_where_the_model_drops_missing_values_is_a_422_naming_the_column(
    served: Served,
) -> None:
    with served.client() as http:
        for i, column in ((0, "a"), (1, "color")):
            r = rest(http, "mixed-drop", [GAPPY[3], GAPPY[i]])
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error["field"] == f"inputs[1].{column}", error
            assert "missing" in error["message"] and "drop" in error["message"]
        r = rest(http, "numbers-drop", numbers(GAPPY))
        assert r.status_code == 422 and r.json()["error"]["field"] == "inputs[0].a", r.text

        tensor = {"name": "input", "shape": [2, 2], "datatype": "FP64", "data": [1, 2, 3, None]}
        r = infer(http, "numbers-drop", [tensor])
        assert r.status_code == 422 and "input[1].b" in r.json()["error"], r.text
        colors = {"name": "color", "shape": [2], "datatype": "BYTES", "data": ["red", None]}
        others: list[dict[str, Any]] = [
            {"name": c, "shape": [2], "datatype": "FP32", "data": [0.1, 0.2]} for c in NUMBERS
        ]
        r = infer(http, "mixed-drop", [*others, colors])
        assert r.status_code == 422 and "inputs[1].color" in r.json()["error"], r.text

        # rows without gaps still answer, as the bundle does
        whole = [GAPPY[3], {"a": 1.0, "b": 2.0, "color": "green"}]
        r = rest(http, "mixed-drop", whole)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == served.bundles["mixed-drop"].predict(whole).predictions


def test_an_absent_column_and_non_json_numbers_stay_refused(served: Served) -> None:
    """An absent key is not a missing value (a misspelt column would be imputed in
    silence), and NaN/Infinity are not JSON: both stay 422 on an imputing model."""
    with served.client() as http:
        r = rest(http, "mixed-mean", [{"b": 0.3, "color": "red"}])
        assert r.status_code == 422 and r.json()["error"]["field"] == "inputs[0].a", r.text
        assert "null" in r.json()["error"]["message"]  # says how to send a missing value
        r = rest(http, "mixed-mean", [{"a": 10**400, "b": None, "color": None}])  # past float64
        assert r.status_code == 422 and r.json()["error"]["field"] == "inputs[0].a", r.text
        for literal in ("NaN", "Infinity"):
            body = f'{{"inputs": [{{"a": {literal}, "b": 1}}]}}'.encode()
            r = http.post(
                f"{API}/deployments/numbers-mean/predict",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code == 422 and r.json()["error"]["field"] == "inputs[0].a", r.text
            tensor = (
                f'{{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [{literal}, 1]}}'
            )
            r = http.post("/v2/models/numbers-mean/infer", content=f'{{"inputs": [{tensor}]}}')
            assert r.status_code == 422 and "null" in r.json()["error"], r.text


def test_missing_values_reach_the_prediction_log_and_drift_as_json(served: Served) -> None:
    """A null that was imputed is logged as null, and the reports that read the rows
    still answer (JSON has no NaN to break them)."""
    with served.client() as http:
        tensor = {"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [None, 0.5]}
        assert infer(http, "numbers-mean", [tensor]).status_code == 200
        assert rest(http, "numbers-mean", [{"a": None, "b": 0.5}]).status_code == 200
        r = http.get(f"{API}/deployments/numbers-mean/predictions")
        assert r.status_code == 200, r.text
        logged = [item["inputs"] for item in r.json()["items"][:2]]  # newest first
        assert logged == [[{"a": None, "b": 0.5}]] * 2, logged  # sample 1: both requests
        r = http.get(f"{API}/deployments/numbers-mean/drift")
        assert r.status_code == 200, r.text
        assert r.json()["rows"] >= 2 and set(r.json()["columns"]) == set(NUMBERS)
