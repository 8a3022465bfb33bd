"""Rate limits against a live server: per key and per project, inference and the
management API counted apart, 429 with Retry-After and the limit named, the refusals in
the metrics and (management calls) in the audit log, and ``kiln quotas set --rps`` in
force at the next request.

The server is ``kiln up``'s app under uvicorn (tests/cli/live_server.py) with tiny
per-key limits. Limits per minute where a test counts requests, so a slow machine
cannot let one through by spreading them over windows; the one per-second limit is
waited out through the Retry-After the server sent. Every test uses keys of its own
(made straight in the key store), so no test spends another's budget.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from api.conftest import check_error_shape, sklearn_csv, train_spec
from cli.live_server import Platform, running_platform
from kiln import fit
from kiln.cli.main import app as cli_app
from kiln.client import Client
from kiln.errors import RateLimitError
from kiln.jobs.worker import Worker
from kiln.settings import Settings
from kiln.store.keys import create_key
from kiln.store.projects import ensure_project
from support import free_port, kiln_env, start_process, stop_process, wait_for_http

API_LIMIT = 12  # per key per minute, on the management API
INFERENCE_LIMIT = 8  # per key per minute, on predict and v2 infer
ROW = {
    "sepal length (cm)": 5.1,
    "sepal width (cm)": 3.5,
    "petal length (cm)": 1.4,
    "petal width (cm)": 0.2,
}
V2 = {
    "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """The server, with model ``iris`` deployed in projects ``default`` and ``lim``."""
    home = tmp_path_factory.mktemp("ratelimits") / "home"
    with running_platform(
        home,
        worker=False,
        rate_limit_api=f"{API_LIMIT}/minute",
        rate_limit_inference=f"{INFERENCE_LIMIT}/minute",
    ) as platform:
        for project in ("default", "lim"):
            key = make_key(platform, project, ["read", "train", "deploy"])
            with httpx.Client(base_url=platform.url, headers=auth(key)) as http:
                files = {"file": ("iris.csv", sklearn_csv("iris"), "text/csv")}
                r = http.post("/api/v1/datasets", files=files)
                assert r.status_code == 201, r.text
                spec = train_spec(r.json()["ref"], epochs=1)
                r = http.post("/api/v1/jobs", json={"kind": "train", "spec": spec})
                assert r.status_code == 201, r.text
                svc = platform.services
                Worker(svc.settings, db=svc.db, store=svc.store).run(until_idle=True)
                body = {"name": "iris", "model": "iris", "backend": "torch"}
                r = http.post("/api/v1/deployments", json=body, timeout=120)
                assert r.status_code == 201, r.text
        yield platform


def make_key(live: Platform, project: str | None, scopes: list[str]) -> str:
    """A new key's secret (``project=None``: a global admin key), from the key store."""
    with live.services.db.session() as s:
        project_id = ensure_project(s, project).id if project is not None else None
        _, secret = create_key(s, project_id=project_id, scopes=scopes)
    return secret


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def get(live: Platform, path: str, key: str) -> httpx.Response:
    return httpx.get(live.url + path, headers=auth(key))


def predict(live: Platform, key: str, v2: bool = False) -> httpx.Response:
    if v2:
        return httpx.post(f"{live.url}/v2/models/iris/infer", headers=auth(key), json=V2)
    path = f"{live.url}/api/v1/deployments/iris/predict"
    return httpx.post(path, headers=auth(key), json={"inputs": [ROW]})


def refused(r: httpx.Response, field: str, *names: str, within: int = 60) -> int:
    """Check a 429 answer: Retry-After in whole seconds, the error naming the limit."""
    assert r.status_code == 429, r.text
    retry = r.headers["Retry-After"]
    assert retry.isdigit() and 1 <= int(retry) <= within, retry
    if r.url.path.startswith("/v2/"):  # the Open Inference Protocol's error shape
        message = r.json()["error"]
    else:
        check_error_shape(r)
        error = r.json()["error"]
        assert (error["code"], error["field"]) == ("rate_limited", field), error
        message = error["message"]
    assert "rate limit exceeded" in message, message
    for name in names:
        assert name in message, message
    return int(retry)


def metric(live: Platform, **labels: str) -> float:
    """``kiln_rate_limited_total`` with these labels (0 if absent), seen by a global key."""
    text = get(live, "/metrics", make_key(live, None, ["admin"])).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^kiln_rate_limited_total\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def kiln(live: Platform, *args: str) -> tuple[int, str]:
    admin = make_key(live, None, ["admin"])
    result = CliRunner().invoke(cli_app, [*args, "--url", live.url, "--api-key", admin])
    return result.exit_code, result.output


def test_the_management_api_limit_is_per_key_and_apart_from_inference(live: Platform) -> None:
    key = make_key(live, "default", ["read", "predict"])
    before = metric(live, project="default", lane="api", limit="key")
    for _ in range(API_LIMIT // 2):
        assert get(live, "/api/v1/models", key).status_code == 200
        assert get(live, "/v2/models/iris", key).status_code == 200  # v2 metadata: api lane
    refused(get(live, "/api/v1/datasets", key), "rate_limit.key", "KILN_RATE_LIMIT_API")
    refused(get(live, "/v2/models/iris", key), "rate_limit.key", f"{API_LIMIT} management")
    # the key's inference budget is its own; health needs no key and is never limited
    assert predict(live, key).status_code == 200
    assert httpx.get(f"{live.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{live.url}/healthz").status_code == 200
    # another key of the same project has its own budget
    assert get(live, "/api/v1/models", make_key(live, "default", ["read"])).status_code == 200
    assert metric(live, project="default", lane="api", limit="key") == before + 2
    # the client raises the error with the server's Retry-After
    with Client(live.url, key) as client, pytest.raises(RateLimitError) as caught:
        client.models.list()
    assert caught.value.field == "rate_limit.key" and 1 <= caught.value.retry_after <= 60
    result = CliRunner().invoke(cli_app, ["models", "list", "--url", live.url, "--api-key", key])
    assert result.exit_code == RateLimitError.exit_code == 16, result.output
    assert "rate limit exceeded" in result.output


def test_the_inference_limit_is_per_key_and_counts_predict_and_v2(live: Platform) -> None:
    key = make_key(live, "default", ["read", "predict"])
    for i in range(INFERENCE_LIMIT):
        assert predict(live, key, v2=i % 2 == 1).status_code == 200
    refused(predict(live, key), "rate_limit.key", "KILN_RATE_LIMIT_INFERENCE")
    refused(predict(live, key, v2=True), "rate_limit.key", f"{INFERENCE_LIMIT} inference")
    assert get(live, "/api/v1/deployments/iris", key).status_code == 200  # api lane: untouched
    other = make_key(live, "default", ["predict"])
    assert predict(live, other).status_code == 200


def test_a_project_limit_set_with_quotas_set_applies_at_once_to_all_its_keys(
    live: Platform,
) -> None:
    first, second = (make_key(live, "lim", ["read", "predict"]) for _ in range(2))
    before = metric(live, project="lim", lane="inference", limit="project")
    code, out = kiln(live, "quotas", "set", "inference", "--rpm", "3", "--project", "lim")
    assert code == 0, out
    assert "requests_inference limited to 3 per minute" in out
    for key in (first, first, second):  # the project's budget, whichever key spends it
        assert predict(live, key).status_code == 200
    for key in (first, second):
        refused(predict(live, key), "rate_limit.project", "project lim", "requests_inference")
    assert get(live, "/api/v1/models", first).status_code == 200  # the api lane has no limit
    assert predict(live, make_key(live, "default", ["predict"])).status_code == 200
    assert metric(live, project="lim", lane="inference", limit="project") == before + 2
    code, out = kiln(live, "quotas", "list", "--project", "lim")
    assert code == 0 and "requests_inference" in out and "minute" in out, out

    code, out = kiln(
        live, "quotas", "remove", "inference", "--period", "minute", "--project", "lim"
    )
    assert code == 0, out
    assert predict(live, second).status_code == 200  # lifted at once too


def test_a_per_second_project_limit_is_waited_out_through_retry_after(live: Platform) -> None:
    with live.services.db.session() as s:
        ensure_project(s, "lim2")
    code, out = kiln(live, "quotas", "set", "api", "--rps", "2", "--project", "lim2")
    assert code == 0, out
    keys = [make_key(live, "lim2", ["read"]) for _ in range(10)]
    answers = [
        get(live, "/api/v1/models", key) for key in keys
    ]  # a key each: only the project counts
    first = next(r for r in answers if r.status_code == 429)
    assert sum(r.status_code == 200 for r in answers) >= 2
    retry = refused(
        first,
        "rate_limit.project",
        "project lim2",
        "2 management API requests per second",
        within=1,
    )
    time.sleep(retry)
    assert get(live, "/api/v1/models", keys[0]).status_code == 200
    code, out = kiln(live, "quotas", "remove", "api", "--period", "second", "--project", "lim2")
    assert code == 0, out


def test_a_refused_management_call_is_audited_as_rate_limited(live: Platform) -> None:
    key = make_key(live, "default", ["admin"])
    key_id = key.split("_")[1]
    for _ in range(API_LIMIT):
        assert get(live, "/api/v1/keys", key).status_code == 200
    r = httpx.post(f"{live.url}/api/v1/keys", headers=auth(key), json={"scopes": ["read"]})
    refused(r, "rate_limit.key")
    events = get(live, "/api/v1/audit", make_key(live, None, ["admin"])).json()["items"]
    mine = [e for e in events if e["key_id"] == key_id]
    assert [(e["action"], e["outcome"], e["status"]) for e in mine] == [
        ("keys.create", "rate_limited", 429)
    ]


def test_bad_limits_are_refused(live: Platform, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="'lots' is not a rate limit"):
        Settings(home=tmp_path, rate_limit_api="lots")
    with pytest.raises(ValidationError, match="at least 1"):
        Settings(home=tmp_path, rate_limit_inference="0/second")
    assert Settings(home=tmp_path, rate_limit_api="off").rate_limit_api == "off"
    # kiln up stops at start with one line naming the variable, not a traceback
    env = {"KILN_HOME": str(tmp_path), "KILN_RATE_LIMIT_API": "lots"}
    result = CliRunner().invoke(cli_app, ["up"], env=env)
    assert result.exit_code == 3, result.output
    assert "KILN_RATE_LIMIT_API: 'lots' is not a rate limit" in result.output
    assert not (tmp_path / "kiln.db").exists()
    admin = make_key(live, None, ["admin"])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"kind": "requests_inference", "period": "day", "limit": 5}, "period"),
        ({"kind": "requests_api", "period": "second", "limit": 2.5}, "limit"),
        ({"kind": "requests_api", "period": "minute", "limit": 0}, "limit"),
        ({"kind": "requests_everything", "period": "second", "limit": 5}, "kind"),
    ]
    for body, field in cases:
        r = httpx.put(f"{live.url}/api/v1/quotas", headers=auth(admin), json=body)
        assert r.status_code == 422 and r.json()["error"]["field"] == field, (body, r.text)
    code, out = kiln(live, "quotas", "set", "compute_seconds", "--rps", "3")
    assert code != 0 and "inference or api" in out, out


@pytest.mark.e2e
def test_kiln_serve_applies_the_inference_limit_to_its_key(tmp_path: Path) -> None:
    """``kiln serve BUNDLE`` (a real process) limits its one static key too."""
    bundle = fit(train_spec("sklearn:iris", name="iris-rl", epochs=1)).save(tmp_path / "b")
    port = free_port()
    key = "k" * 32
    env = kiln_env(TMPDIR=str(tmp_path), KILN_RATE_LIMIT_INFERENCE="2/minute")
    log = tmp_path / "serve.log"
    args = ["serve", str(bundle), "--port", str(port), "--api-key", key, "--backend", "torch"]
    proc = start_process([sys.executable, "-m", "kiln.cli.main", *args], log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        # a guard against hanging, not a measurement
        wait_for_http(f"{url}/readyz", proc=proc, log=log, timeout=120)
        path = f"{url}/api/v1/deployments/iris-rl/predict"
        answers = [httpx.post(path, headers=auth(key), json={"inputs": [ROW]}) for _ in range(3)]
        assert [r.status_code for r in answers[:2]] == [200, 200], answers[0].text
        refused(answers[2], "rate_limit.key", "KILN_RATE_LIMIT_INFERENCE")
    finally:
        stop_process(proc, signal.SIGINT)
