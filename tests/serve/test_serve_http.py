"""Serving end to end over real HTTP: a uvicorn server on 127.0.0.1 and real clients.

One server per module on a copy of the trained home (model ``iris`` v1 and v2, trained
through the job queue). Each test makes deployments of its own names, so tests do not
depend on each other's order. Predictions are compared with ``kiln.load(bundle)`` on the
same rows, version by version, so a response that names the wrong version fails too.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from serve_support import Home, bearer, copy_home, iris, rows, serve

from support import async_wait_for

API = "/api/v1"
FEATURES = list(iris().columns.drop("target"))


class Live:
    """The module's server: its URL, keys, and reference predictions per version."""

    def __init__(self, url: str, home: Home) -> None:
        import kiln

        self.url = url
        self.home = home
        self.admin = httpx.Client(base_url=url, headers=bearer(home.admin), timeout=60)
        self.predictor = httpx.Client(
            base_url=url, headers=bearer(home.keys["predict"]), timeout=60
        )
        table = iris().drop(columns="target")
        self.reference = {v: kiln.load(home.bundle_dir(v)).predict(table) for v in (1, 2)}

    def deploy(self, name: str, version: int | str = 1, **config: Any) -> dict[str, Any]:
        r = self.admin.post(
            f"{API}/deployments", json={"name": name, "model": "iris", "version": version, **config}
        )
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    def patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.admin.patch(f"{API}/deployments/{name}", json=body)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def predict(self, name: str, inputs: Any) -> httpx.Response:
        return self.predictor.post(f"{API}/deployments/{name}/predict", json={"inputs": inputs})

    def check(self, body: dict[str, Any], start: int, n: int) -> None:
        """A predict response is the named version's own answer for rows start..start+n."""
        assert body["model"] == "iris"
        expected = self.reference[body["version"]]
        picked = [(start + i) % 150 for i in range(n)]
        assert body["predictions"] == [expected.predictions[i] for i in picked]
        assert body["labels"] == expected.labels
        np.testing.assert_allclose(
            body["probabilities"], [expected.probabilities[i] for i in picked], atol=1e-5
        )

    def metrics(self) -> dict[str, Any]:
        from prometheus_client.parser import text_string_to_metric_families

        r = self.predictor.get("/metrics")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(r.text)}


@pytest.fixture(scope="module")
def live(trained_home: Home, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    home = copy_home(trained_home, tmp_path_factory.mktemp("serve-http") / "home")
    with serve(home.settings()) as url:
        server = Live(url, home)
        yield server
        server.admin.close()
        server.predictor.close()


def test_deploy_then_predict_answers_with_the_bundles_own_predictions(live: Live) -> None:
    # checks by version mean something only if the versions answer differently
    v1, v2 = live.reference[1], live.reference[2]
    assert not np.allclose(v1.probabilities, v2.probabilities, atol=1e-3)

    out = live.deploy("basic", 1)
    assert out["state"] == "ready"
    assert out["model"] == "iris"
    assert [(r["version"], r["weight"]) for r in out["routes"]] == [(1, 100)]
    assert out["routes"][0]["backend"] in ("onnxruntime", "torch")
    r = live.predict("basic", rows(150))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1
    live.check(body, 0, 150)
    # one row, and rows from the middle of the table
    for start, n in ((0, 1), (60, 7)):
        r = live.predict("basic", rows(n, start))
        assert r.status_code == 200, r.text
        live.check(r.json(), start, n)
    # extra keys in a row (the target, say) are ignored
    extra = [{**row, "target": "setosa"} for row in rows(2, 100)]
    r = live.predict("basic", extra)
    assert r.status_code == 200, r.text
    live.check(r.json(), 100, 2)
    listed = live.admin.get(f"{API}/deployments").json()
    assert "basic" in [d["name"] for d in listed]
    assert live.admin.get(f"{API}/deployments/basic").json()["routes"][0]["version"] == 1


def raw_predict(live: Live, name: str, body: bytes) -> httpx.Response:
    return live.predictor.post(
        f"{API}/deployments/{name}/predict",
        content=body,
        headers={"content-type": "application/json"},
    )


def test_invalid_inputs_are_refused_naming_row_and_column(live: Live) -> None:
    live.deploy("strict", 1)
    good = rows(3)

    def refused(inputs: Any) -> dict[str, Any]:
        r = live.predict("strict", inputs)
        assert r.status_code == 422, r.text
        error: dict[str, Any] = r.json()["error"]
        return error

    missing = [dict(row) for row in good]
    del missing[1][FEATURES[3]]
    error = refused(missing)
    assert error["field"] == f"inputs[1].{FEATURES[3]}"
    assert "missing" in error["message"]

    text = [dict(row) for row in good]
    text[2][FEATURES[0]] = "five"
    assert refused(text)["field"] == f"inputs[2].{FEATURES[0]}"

    flag = [dict(row) for row in good]
    flag[0][FEATURES[1]] = True  # a bool is not a number
    assert refused(flag)["field"] == f"inputs[0].{FEATURES[1]}"

    assert refused([])["field"] == "inputs"
    assert refused(rows(10_001))["field"] == "inputs"
    assert refused(["not a row"])["field"].startswith("inputs")

    # non-finite numbers cannot be written in strict JSON, but parsers accept these
    row = json.dumps(good[0])
    for literal in ("1e999", "-1e999", "NaN", "Infinity"):
        poisoned = row.replace(json.dumps(good[0][FEATURES[2]]), literal, 1)
        assert literal in poisoned
        r = raw_predict(live, "strict", f'{{"inputs": [{row}, {poisoned}]}}'.encode())
        assert r.status_code == 422, (literal, r.text)
        assert r.json()["error"]["field"] == f"inputs[1].{FEATURES[2]}", literal

    r = raw_predict(live, "strict", b'{"inputs": [')
    assert r.status_code == 422, r.text
    r = raw_predict(live, "strict", b'{"inputs": [{}], "extra": 1}')  # strict body
    assert r.status_code == 422, r.text

    # nothing of the above reached the model, and the deployment still answers
    r = live.predict("strict", good)
    assert r.status_code == 200, r.text
    live.check(r.json(), 0, 3)


def test_a_body_over_8_mib_is_refused_with_413(live: Live) -> None:
    live.deploy("big", 1)
    padding = " " * (8 << 20)
    r = raw_predict(live, "big", f'{{"inputs": [{json.dumps(rows(1)[0])}]}}{padding}'.encode())
    assert r.status_code == 413, r.text


Answer = tuple[float, int, Any, int]  # sent (monotonic), status, body, first row


async def _load(
    live: Live, name: str, stop: asyncio.Event, results: list[Answer], tasks: int = 8
) -> None:
    """Predictions from ``tasks`` concurrent callers until ``stop``, appended to ``results``."""

    async def caller(client: httpx.AsyncClient, k: int) -> None:
        i = 0
        while not stop.is_set():
            start = (k * 31 + i * 7) % 150
            sent = time.monotonic()
            r = await client.post(
                f"{API}/deployments/{name}/predict", json={"inputs": rows(3, start)}
            )
            results.append((sent, r.status_code, r.json(), start))
            i += 1

    limits = httpx.Limits(max_connections=tasks)
    async with httpx.AsyncClient(
        base_url=live.url, headers=bearer(live.home.keys["predict"]), timeout=60, limits=limits
    ) as client:
        await asyncio.gather(*(caller(client, k) for k in range(tasks)))


def test_hot_swap_under_load_drops_no_request(live: Live) -> None:
    live.deploy("swap", 1)

    async def main() -> tuple[list[Answer], float]:
        stop = asyncio.Event()
        results: list[Answer] = []
        load = asyncio.ensure_future(_load(live, "swap", stop, results))

        def answered_since(since: float) -> bool:
            if load.done():  # a caller failed: its exception, not a timeout
                load.result()
                raise AssertionError("the load stopped before it was told to")
            return sum(1 for sent, *_ in results if sent > since) >= 8

        before = "8 answers before the swap"
        await async_wait_for(lambda: answered_since(-math.inf), timeout=60, what=before)
        async with httpx.AsyncClient(
            base_url=live.url, headers=bearer(live.home.admin), timeout=60
        ) as admin:
            r = await admin.patch(f"{API}/deployments/swap", json={"version": 2})
        swapped = time.monotonic()
        assert r.status_code == 200, r.text
        assert [(x["version"], x["weight"]) for x in r.json()["routes"]] == [(2, 100)]
        after = "8 answers to requests sent after the swap"
        await async_wait_for(lambda: answered_since(swapped), timeout=60, what=after)
        stop.set()
        await load
        return results, swapped

    results, swapped = asyncio.run(main())
    failures = [(status, body) for _, status, body, _ in results if status != 200]
    assert not failures, failures[:5]
    before = [body["version"] for sent, _, body, _ in results if sent < swapped]
    after = [body["version"] for sent, _, body, _ in results if sent > swapped]
    assert 1 in before, "no request was answered before the swap"
    assert after, "no request was sent after the swap"
    assert set(after) == {2}
    for _, _, body, start in results:
        live.check(body, start, 3)


def test_canary_splits_traffic_by_weight_and_rollback_restores_it(live: Live) -> None:
    live.deploy("canary", 1)
    out = live.patch(
        "canary", {"routes": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]}
    )
    assert sorted((x["version"], x["weight"]) for x in out["routes"]) == [(1, 90), (2, 10)]
    got = live.admin.get(f"{API}/deployments/canary").json()
    assert sorted((x["version"], x["weight"]) for x in got["routes"]) == [(1, 90), (2, 10)]

    async def send(n: int) -> list[dict[str, Any]]:
        semaphore = asyncio.Semaphore(8)
        async with httpx.AsyncClient(
            base_url=live.url, headers=bearer(live.home.keys["predict"]), timeout=60
        ) as client:

            async def one(i: int) -> dict[str, Any]:
                async with semaphore:
                    r = await client.post(
                        f"{API}/deployments/canary/predict", json={"inputs": rows(1, i)}
                    )
                assert r.status_code == 200, r.text
                body: dict[str, Any] = r.json()
                live.check(body, i % 150, 1)
                return body

            return await asyncio.gather(*(one(i) for i in range(n)))

    n, p = 400, 0.10
    versions = [b["version"] for b in asyncio.run(send(n))]
    assert set(versions) <= {1, 2}
    share = versions.count(2)
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(share - n * p) <= 4 * sigma, share  # 16 .. 64 of 400

    live.patch("canary", {"routes": [{"version": 1, "weight": 100}]})  # rollback
    assert {b["version"] for b in asyncio.run(send(100))} == {1}


def test_kserve_v2_with_the_standard_triton_client(live: Live) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    live.deploy("triton", 2)
    key = live.home.keys["predict"]

    def headers() -> dict[str, str]:
        # a fresh dict per call: infer() writes Inference-Header-Content-Length into it
        return bearer(key)

    client = triton.InferenceServerClient(url=live.url.removeprefix("http://"))
    try:
        assert client.is_server_live()  # no key needed
        assert client.is_server_ready()
        assert client.is_model_ready("triton", headers=headers())
        assert not client.is_model_ready("nope", headers=headers())
        assert not client.is_model_ready("triton")  # no key: 401
        meta = client.get_model_metadata("triton", headers=headers())
        assert meta["name"] == "triton"
        assert meta["versions"] == ["2"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        assert {o["name"] for o in meta["outputs"]} == {"predictions", "probabilities"}

        values = iris()[FEATURES].to_numpy(dtype=np.float32)[40:52]
        expected = live.reference[2]
        for binary in (True, False):
            tensor = triton.InferInput("input", list(values.shape), "FP32")
            tensor.set_data_from_numpy(values, binary_data=binary)
            wanted = [
                triton.InferRequestedOutput("predictions", binary_data=binary),
                triton.InferRequestedOutput("probabilities", binary_data=binary),
            ]
            result = client.infer("triton", [tensor], outputs=wanted, headers=headers())
            response = result.get_response()
            assert response["model_name"] == "triton"
            assert response["model_version"] == "2"
            predictions = [
                p.decode() if isinstance(p, bytes) else p for p in result.as_numpy("predictions")
            ]
            assert predictions == expected.predictions[40:52], binary
            np.testing.assert_allclose(
                result.as_numpy("probabilities"), expected.probabilities[40:52], atol=1e-5
            )
        # no outputs named: all of them
        tensor = triton.InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(values[:1])
        result = client.infer("triton", [tensor], headers=headers(), request_id="req-7")
        assert result.get_response()["id"] == "req-7"
        assert result.as_numpy("probabilities").shape == (1, 3)

        # errors reach the client in the protocol's own shape
        bad = values.copy()
        bad[1, 2] = np.inf  # (NaN would be a missing value, which iris imputes)
        tensor = triton.InferInput("input", list(bad.shape), "FP32")
        tensor.set_data_from_numpy(bad)
        with pytest.raises(InferenceServerException, match=r"input\[1\]"):
            client.infer("triton", [tensor], headers=headers())
        with pytest.raises(InferenceServerException):
            client.infer("triton", [tensor])  # no key
    finally:
        client.close()


def test_kserve_v2_errors_use_the_protocols_shape(live: Live) -> None:
    live.deploy("v2errors", 1)
    url = "/v2/models/v2errors/infer"
    r = live.predictor.post(url, json={"inputs": [{"name": "input", "datatype": "FP32"}]})
    assert r.status_code == 422
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    r = live.predictor.post(url, content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 422 and set(r.json()) == {"error"}
    r = live.predictor.post("/v2/models/absent/infer", json={"inputs": []})
    assert r.status_code == 404 and set(r.json()) == {"error"}
    # one tensor per column works as well as the matrix
    table = iris()[FEATURES].iloc[10:13]
    inputs = [
        {"name": c, "datatype": "FP32", "shape": [3], "data": table[c].tolist()} for c in FEATURES
    ]
    r = live.predictor.post(url, json={"inputs": inputs})
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["predictions"]["data"] == live.reference[1].predictions[10:13]


def test_a_full_queue_answers_503_with_retry_after_and_a_deadline_504(live: Live) -> None:
    # a batch stays open for max_delay_ms waiting for more rows: the first request
    # holds the queue's one place for a second, deterministically
    live.deploy("tight", 1, max_batch_size=4096, max_delay_ms=1000, max_queue=1)

    def depth() -> int:
        got = live.admin.get(f"{API}/deployments/tight").json()
        return int(got["routes"][0]["queue_depth"])

    async def main() -> None:
        async with httpx.AsyncClient(
            base_url=live.url, headers=bearer(live.home.keys["predict"]), timeout=60
        ) as client:

            def predict(start: int) -> Any:
                return client.post(
                    f"{API}/deployments/tight/predict", json={"inputs": rows(2, start)}
                )

            first = asyncio.ensure_future(predict(0))
            while await asyncio.to_thread(depth) < 1:
                assert not first.done(), first.result().text
                await asyncio.sleep(0.01)
            flood = await asyncio.gather(*(predict(i) for i in range(8)))
            v2 = await client.post(
                "/v2/models/tight/infer",
                json={
                    "inputs": [
                        {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
                    ]
                },
            )
            answered = await first
        for r in flood:
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "overloaded"
        assert v2.status_code == 503 and set(v2.json()) == {"error"}
        assert v2.headers["retry-after"] == "1"
        assert answered.status_code == 200, answered.text
        live.check(answered.json(), 0, 2)

    asyncio.run(main())

    # a deadline shorter than the batching delay: 504, and the queue frees its place
    live.patch("tight", {"timeout_ms": 50})
    started = time.monotonic()
    r = live.predict("tight", rows(1))
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "timeout"
    assert time.monotonic() - started < 0.9  # it did not wait for the batch
    live.patch("tight", {"timeout_ms": 10_000, "max_delay_ms": 0})
    r = live.predict("tight", rows(1, 5))
    assert r.status_code == 200, r.text
    live.check(r.json(), 5, 1)


def test_inference_routes_need_a_key_the_scope_and_the_project(live: Live) -> None:
    live.deploy("guarded", 1)
    matrix = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}
        ]
    }
    calls = [
        ("POST", f"{API}/deployments/guarded/predict", {"inputs": rows(1)}),
        ("GET", "/v2/models/guarded", None),
        ("GET", "/v2/models/guarded/ready", None),
        ("POST", "/v2/models/guarded/infer", matrix),
    ]
    keys = live.home.keys
    client = httpx.Client(base_url=live.url, timeout=60)
    try:
        for method, path, body in calls:

            def call(headers: dict[str, str], params: Any = None) -> httpx.Response:
                return client.request(method, path, json=body, headers=headers, params=params)  # noqa: B023

            assert call({}).status_code == 401, path
            assert (
                call({"Authorization": "Bearer kiln_0123456789abcdef_" + "x" * 43}).status_code
                == 401
            )
            assert call(bearer(keys["read"])).status_code == 403, path
            assert call(bearer(keys["deploy"])).status_code == 403, path
            assert call(bearer(keys["other"])).status_code == 404, path  # another project's
            assert call(bearer(live.home.admin), {"project": "other"}).status_code == 404, path
            assert call(bearer(keys["predict"])).status_code == 200, path
            assert call(bearer(live.home.admin)).status_code == 200, path  # global: default
        for path in ("/v2/health/live", "/v2/health/ready", "/readyz", "/healthz"):
            assert client.get(path).status_code == 200, path
        assert client.get("/v2/health/ready").json() == {"ready": True}
    finally:
        client.close()


def test_metrics_count_requests_rows_and_batches(live: Live) -> None:
    live.deploy("metered", 1)
    sizes = [1, 4, 2, 3, 5, 1, 2]

    async def main() -> list[int]:
        async with httpx.AsyncClient(
            base_url=live.url, headers=bearer(live.home.keys["predict"]), timeout=60
        ) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"{API}/deployments/metered/predict", json={"inputs": rows(n, 10 * i)}
                    )
                    for i, n in enumerate(sizes)
                )
            )
        return [r.status_code for r in responses]

    assert asyncio.run(main()) == [200] * len(sizes)
    assert live.predict("metered", []).status_code == 422
    families = live.metrics()

    def value(family: str, sample: str, **labels: str) -> float | None:
        for s in families[family].samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        return None

    mine = {"deployment": "metered", "version": "1"}
    assert value("kiln_requests", "kiln_requests_total", **mine, code="200") == len(sizes)
    assert value("kiln_requests", "kiln_requests_total", deployment="metered", code="422") == 1
    assert value("kiln_rows", "kiln_rows_total", **mine) == sum(sizes)
    batches = value("kiln_batch_rows", "kiln_batch_rows_count", **mine)
    assert batches is not None and 1 <= batches <= len(sizes)
    assert value("kiln_batch_rows", "kiln_batch_rows_sum", **mine) == sum(sizes)  # once each
    assert value("kiln_queue_wait_seconds", "kiln_queue_wait_seconds_count", **mine) == len(sizes)
    assert value("kiln_model_seconds", "kiln_model_seconds_count", **mine) == batches
    assert value("kiln_request_seconds", "kiln_request_seconds_count", deployment="metered") == len(
        sizes
    )
    assert value("kiln_queue_depth", "kiln_queue_depth", **mine) == 0
    loads = [s.value for s in families["kiln_model_load_seconds"].samples]
    assert loads and all(v > 0 for v in loads)
    assert value("process_resident_memory_bytes", "process_resident_memory_bytes") > 0  # type: ignore[operator]

    assert httpx.get(f"{live.url}/metrics").status_code == 401
    r = httpx.get(f"{live.url}/metrics", headers=bearer(live.home.keys["read"]))
    assert r.status_code == 200  # any valid key


def test_deployment_management_errors(live: Live) -> None:
    def create(**body: Any) -> httpx.Response:
        return live.admin.post(f"{API}/deployments", json={"model": "iris", **body})

    def error(r: httpx.Response, status: int) -> dict[str, Any]:
        assert r.status_code == status, r.text
        out: dict[str, Any] = r.json()["error"]
        return out

    assert error(create(name="m1", model="nope"), 422)["field"] == "model"
    assert error(create(name="m1", version=9), 422)["field"] == "version"
    assert error(create(name="m1", version="no-such-alias"), 422)["field"] == "version"
    assert error(create(name="Not A Name!"), 422)["field"] == "name"
    assert error(create(name="m1", backend="tpu"), 422)["field"] == "backend"
    assert error(create(name="m1", max_batch_size=0), 422)["field"] == "max_batch_size"
    # a key without the deploy scope
    r = live.predictor.post(f"{API}/deployments", json={"name": "m1", "model": "iris"})
    assert error(r, 403)
    assert live.admin.get(f"{API}/deployments/m1").status_code == 404  # nothing was made

    assert create(name="m1", version="latest").json()["routes"][0]["version"] == 2
    assert error(create(name="m1", version=1), 409)["field"] == "name"

    def patch(body: dict[str, Any], name: str = "m1") -> httpx.Response:
        return live.admin.patch(f"{API}/deployments/{name}", json=body)

    zero = [{"version": 1, "weight": 0}, {"version": 2, "weight": 0}]
    assert error(patch({"routes": zero}), 422)["field"] == "routes"
    twice = [{"version": 1, "weight": 50}, {"version": 1, "weight": 50}]
    assert error(patch({"routes": twice}), 422)["field"] == "routes"
    assert error(patch({"routes": []}), 422)["field"] == "routes"
    unknown = [{"version": 1, "weight": 50}, {"version": 5, "weight": 50}]
    assert error(patch({"routes": unknown}), 422)["field"] == "routes.1.version"
    assert error(patch({"version": 9}), 422)["field"] == "version"
    assert error(patch({"version": 1}, name="absent"), 404)
    # after refused changes the deployment is as it was, and answers
    got = live.admin.get(f"{API}/deployments/m1").json()
    assert [(x["version"], x["weight"]) for x in got["routes"]] == [(2, 100)]
    r = live.predict("m1", rows(2))
    assert r.status_code == 200 and r.json()["version"] == 2

    assert live.admin.delete(f"{API}/deployments/m1").status_code == 204
    assert error(live.predict("m1", rows(1)), 404)
    assert live.admin.get(f"{API}/deployments/m1").status_code == 404
    assert live.admin.delete(f"{API}/deployments/m1").status_code == 404
    r = live.predictor.post("/v2/models/m1/infer", json={"inputs": []})
    assert r.status_code == 404
    # the name is free again
    assert create(name="m1", version=1).status_code == 201


def test_another_project_cannot_see_or_deploy_this_projects_model(live: Live) -> None:
    other = httpx.Client(base_url=live.url, headers=bearer(live.home.keys["other"]), timeout=60)
    try:
        r = other.post(f"{API}/deployments", json={"name": "stolen", "model": "iris"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "model"
        live.deploy("shared-name", 1)
        assert "shared-name" not in [d["name"] for d in other.get(f"{API}/deployments").json()]
        assert other.get(f"{API}/deployments/shared-name").status_code == 404
        assert other.delete(f"{API}/deployments/shared-name").status_code == 404
        assert other.patch(f"{API}/deployments/shared-name", json={"version": 2}).status_code == 404
    finally:
        other.close()
    assert live.admin.get(f"{API}/deployments/shared-name").json()["routes"][0]["version"] == 1
