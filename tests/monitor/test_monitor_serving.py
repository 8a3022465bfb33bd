"""Monitoring of real deployments through the API: the live window, drift, the
prediction log and prediction metering with quotas.

One iris model is trained per module (``kiln.fit``) and registered twice in a template
home: version 1 as trained, version 2 the same bundle without reference statistics (as
bundles written before kiln kept them). Each test serves its own copy of the home.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from support import wait_for

API = "/api/v1"
SPEC: dict[str, Any] = {
    "name": "iris",
    "task": "classification",
    "data": {"source": "sklearn:iris", "target": "target"},
    "model": {"type": "mlp", "hidden": [8]},
    "train": {"epochs": 3, "device": "cpu", "optimizer": {"name": "adam", "lr": 0.05}},
}
PETAL = "petal length (cm)"
LOG_PREFIX = "projects/default/deployments/iris/predictions"


def iris_rows() -> list[dict[str, float]]:
    from sklearn.datasets import load_iris

    frame = load_iris(as_frame=True).frame.drop(columns="target")
    return [{k: float(v) for k, v in row.items()} for row in frame.to_dict("records")]


ROWS = iris_rows()


@dataclass
class Template:
    path: Path
    admin: str


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    import kiln
    from kiln.app import build_services
    from kiln.server import bootstrap
    from kiln.settings import Settings
    from kiln.store.artifacts import safe_key
    from kiln.store.registry import register_version
    from kiln.store.tables import Project

    root = tmp_path_factory.mktemp("monitor")
    trained = root / "iris"
    kiln.fit(SPEC, out=trained)
    assert json.loads((trained / "kiln.json").read_text())["reference"]["columns"]
    old = root / "iris-old"
    shutil.copytree(trained, old)
    meta = json.loads((old / "kiln.json").read_text())
    del meta["reference"]
    (old / "kiln.json").write_text(json.dumps(meta))

    home = root / "home"
    svc = build_services(Settings(home=home))
    admin = bootstrap(svc)
    assert admin is not None
    with svc.db.session() as s:
        project = s.scalar(select(Project).where(Project.name == "default"))
        assert project is not None
        for n, bundle in [(1, trained), (2, old)]:
            key = safe_key("projects", "default", "models", "iris", f"v{n}")
            svc.store.put_dir(key, bundle)
            register_version(
                s,
                project,
                "iris",
                artifact_key=key,
                task="classification",
                metrics={},
                summary={},
                size_bytes=0,
            )
    svc.db.dispose()
    return Template(home, admin)


@dataclass
class Home:
    path: Path
    admin: str

    def settings(self, **overrides: Any) -> Any:
        from kiln.settings import Settings

        return Settings(home=self.path, **overrides)

    @contextmanager
    def db(self) -> Iterator[Any]:
        from kiln.store.db import Database

        database = Database(self.settings().resolved_database_url)
        try:
            with database.session() as s:
                yield s
        finally:
            database.dispose()

    def store(self) -> Any:
        """The platform's store (encrypted, as the server opens it)."""
        from kiln.store.crypto import open_artifacts
        from kiln.store.db import Database

        return open_artifacts(self.settings(), Database(self.settings().resolved_database_url))

    @contextmanager
    def client(self, deploy: bool = True, **settings: Any) -> Iterator[TestClient]:
        """The app on this home (its own services, as ``kiln up``), iris v1 deployed as
        ``iris`` unless ``deploy`` is False (a restart: it comes back by itself)."""
        from kiln.app import create_app

        with TestClient(create_app(self.settings(**settings))) as c:
            c.headers["Authorization"] = f"Bearer {self.admin}"
            if deploy:
                r = c.post(
                    f"{API}/deployments", json={"name": "iris", "model": "iris", "version": 1}
                )
                assert r.status_code == 201, r.text
            yield c


@pytest.fixture
def home(template: Template, tmp_path: Path) -> Home:
    shutil.copytree(template.path, tmp_path / "home")
    return Home(tmp_path / "home", template.admin)


def predict(c: TestClient, rows: list[dict[str, Any]]) -> Any:
    return c.post(f"{API}/deployments/iris/predict", json={"inputs": rows})


def manager(c: TestClient) -> Any:
    return c.app.state.deployments  # type: ignore[attr-defined]


def project_id(c: TestClient) -> int:
    pid: int = next(iter(manager(c).live))[0]
    return pid


# ---- the live window -------------------------------------------------------------


def test_window_counts_answered_and_failed_requests(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.errors import DeadlineExceeded, QueueFull

    with home.client() as c:
        for i in range(5):
            assert predict(c, ROWS[i * 3 : i * 3 + 3]).status_code == 200
        missing = {k: v for k, v in ROWS[0].items() if k != PETAL}
        assert predict(c, [missing]).status_code == 422
        assert predict(c, [{**ROWS[0], PETAL: "long"}]).status_code == 422
        v2 = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32"}]}
        v2["inputs"][0]["data"] = [v for row in ROWS[:2] for v in row.values()]
        assert c.post("/v2/models/iris/infer", json=v2).status_code == 200

        batcher = manager(c).get(project_id(c), "iris").routes[0].batcher
        for exc, status in [(QueueFull, 503), (DeadlineExceeded, 504)]:

            async def refuse(*args: Any, exc: type[Exception] = exc) -> Any:
                raise exc()

            monkeypatch.setattr(batcher, "predict", refuse)
            assert predict(c, ROWS[:1]).status_code == status
        monkeypatch.undo()

        w = manager(c).window(project_id(c), "iris", seconds=60)
    assert w["deployment"] == "iris" and w["state"] == "ready"
    assert w["requests"] == 10
    assert w["statuses"] == {"200": 6, "422": 2, "503": 1, "504": 1}
    assert w["rows"] == 17 and w["errors"] == 4
    assert w["error_rate"] == pytest.approx(0.4)
    assert w["requests_per_s"] > 0 and w["rows_per_s"] > 0
    assert w["versions"] == {"1": {"requests": 10, "rows": 17, "errors": 4}}
    assert w["batches"] == 6  # one per answered request: they came one at a time
    assert w["mean_batch_rows"] == pytest.approx(17 / 6, abs=1e-3)
    assert 0 < w["p50_ms"] <= w["p99_ms"]
    assert w["queue_depth"] == 0
    assert len(w["series"]) == 60
    assert sum(p["requests_per_s"] for p in w["series"][-3:]) > 0


# ---- drift ---------------------------------------------------------------------------


def _metrics(c: TestClient) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    r = c.get("/metrics")
    assert r.status_code == 200, r.text
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_drift_flags_the_shifted_column(home: Home) -> None:
    with home.client(drift_window=300) as c:
        for i in range(0, 150, 50):
            assert predict(c, ROWS[i : i + 50]).status_code == 200
        report = c.get(f"{API}/deployments/iris/drift").json()
        assert report["rows"] == 150 and report["reference"] is True and report["version"] == 1
        assert report["threshold"] == 0.2
        assert report["drifted"] == [], report
        assert set(report["columns"]) == set(ROWS[0])
        shifted = [{**row, PETAL: row[PETAL] + 5} for row in ROWS * 2]
        assert predict(c, shifted).status_code == 200  # 300 rows: the whole window
        report = c.get(f"{API}/deployments/iris/drift").json()
        assert report["drifted"] == [PETAL], report
        assert report["columns"][PETAL]["psi"] > 0.2

        families = _metrics(c)
        psi = {
            s.labels["column"]: s.value
            for s in families["kiln_drift_psi"].samples
            if s.labels["deployment"] == "iris"
        }
        assert psi[PETAL] == pytest.approx(report["columns"][PETAL]["psi"])
        assert all(v < 0.2 for k, v in psi.items() if k != PETAL)
        (flagged,) = families["kiln_drift_flagged_columns"].samples
        assert flagged.labels == {"project": "default", "deployment": "iris"} and flagged.value == 1

        # the values are those of the moment of the scrape
        for _ in range(2):
            assert predict(c, ROWS * 2).status_code == 200
        families = _metrics(c)
        assert families["kiln_drift_flagged_columns"].samples[0].value == 0

        # version 2's bundle predates reference statistics: said, not a crash
        r = c.patch(f"{API}/deployments/iris", json={"version": 2})
        assert r.status_code == 200, r.text
        assert predict(c, ROWS[:5]).status_code == 200
        report = c.get(f"{API}/deployments/iris/drift").json()
        assert report["reference"] is False and report["version"] == 2
        assert "no reference statistics" in report["message"]
        families = _metrics(c)
        assert families["kiln_drift_psi"].samples == []
        assert c.get(f"{API}/deployments/nope/drift").status_code == 404


# ---- Prometheus series per project -----------------------------------------------------


def test_metrics_are_labelled_and_shown_per_project(home: Home) -> None:
    """Two projects each deploy ``iris``: their series stay apart, and a project's key
    sees only its own (a global key sees both, or one with ``?project=``)."""
    from prometheus_client.parser import text_string_to_metric_families

    from kiln.store.projects import ensure_project
    from kiln.store.registry import register_version

    with home.db() as s:
        register_version(
            s,
            ensure_project(s, "other"),
            "iris",
            artifact_key="projects/default/models/iris/v1",
            task="classification",
            metrics={},
            summary={},
            size_bytes=0,
        )
    with home.client() as c:
        r = c.post(
            f"{API}/deployments",
            params={"project": "other"},
            json={"name": "iris", "model": "iris", "version": 1},
        )
        assert r.status_code == 201, r.text
        keys = {}
        for project in ("default", "other"):
            r = c.post(f"{API}/keys", json={"project": project, "scopes": ["predict", "read"]})
            assert r.status_code == 201, r.text
            keys[project] = {"Authorization": f"Bearer {r.json()['key']}"}
        for project, n in (("default", 3), ("other", 2)):
            for i in range(n):
                r = c.post(
                    f"{API}/deployments/iris/predict",
                    json={"inputs": ROWS[i : i + 4]},
                    headers=keys[project],
                )
                assert r.status_code == 200, r.text

        def scrape(headers: dict[str, str], **params: str) -> dict[tuple[str, str], float]:
            """(project, family) -> the sum of its samples, for every kiln_* family."""
            r = c.get("/metrics", headers=headers, params=params)
            assert r.status_code == 200, r.text
            families = {f.name: f for f in text_string_to_metric_families(r.text)}
            assert families["process_resident_memory_bytes"].samples  # not a project's
            seen: dict[tuple[str, str], float] = {}
            for name, family in families.items():
                for sample in family.samples:
                    if name.startswith("kiln_") and sample.name == f"{name}_total":
                        key = (sample.labels["project"], name)
                        seen[key] = seen.get(key, 0) + sample.value
                    elif name.startswith("kiln_"):
                        seen.setdefault((sample.labels["project"], name), 0)
            return seen

        mine = scrape(keys["default"])
        assert {project for project, _ in mine} == {"default"}
        assert mine[("default", "kiln_requests")] == 3
        assert mine[("default", "kiln_rows")] == 12
        assert ("default", "kiln_queue_depth") in mine and ("default", "kiln_drift_psi") in mine
        theirs = scrape(keys["other"])
        assert {project for project, _ in theirs} == {"other"}
        assert theirs[("other", "kiln_requests")] == 2
        assert theirs[("other", "kiln_rows")] == 8
        admin = {"Authorization": f"Bearer {home.admin}"}
        both = scrape(admin)
        assert both == {**mine, **theirs}
        assert scrape(admin, project="other") == theirs
        # a key of one project cannot ask for another's series
        assert scrape(keys["default"], project="other") == mine

        # a swap drops the gauges of the version no longer served, and only that project's
        r = c.patch(f"{API}/deployments/iris", json={"version": 2})
        assert r.status_code == 200, r.text
        r = c.get("/metrics")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        depth = {
            (s.labels["project"], s.labels["version"]) for s in families["kiln_queue_depth"].samples
        }
        assert depth == {("default", "2"), ("other", "1")}
        loads = {
            (s.labels["project"], s.labels["version"])
            for s in families["kiln_model_load_seconds"].samples
        }
        # each deployment has its load time, though "other" reused the loaded model
        assert loads == {("default", "2"), ("other", "1")}


# ---- the prediction log ---------------------------------------------------------------


def _log_lines(home: Home) -> list[dict[str, Any]]:
    store = home.store()
    lines = []
    for key in store.list(LOG_PREFIX):
        assert re.fullmatch(rf"{LOG_PREFIX}/\d{{4}}-\d\d-\d\d/\d{{6}}-\w+\.jsonl", key), key
        lines += [json.loads(x) for x in store.get_bytes(key).decode().splitlines()]
    return lines


def test_prediction_log_keeps_every_request_at_sample_one(home: Home) -> None:
    with home.client(prediction_log_sample=1.0, monitor_flush_seconds=0.05) as c:
        for n in (1, 2, 3):
            assert predict(c, ROWS[:n]).status_code == 200
        r = c.get(f"{API}/deployments/iris/predictions", params={"limit": 2})
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert [len(i["inputs"]) for i in items] == [3, 2]  # newest first
        # written by the background flush
        wait_for(lambda: len(_log_lines(home)) == 3, timeout=10, what="3 prediction log lines")
    with home.client(deploy=False) as c:  # restarted: the deployment is restored
        body = c.get(f"{API}/deployments/iris/predictions").json()
    assert body["sample"] == 0.1 and body["full"] is False
    items = body["items"]
    assert [len(i["inputs"]) for i in items] == [3, 2, 1]
    newest = items[0]
    assert newest["inputs"] == ROWS[:3] and newest["version"] == 1
    assert len(newest["predictions"]) == 3 and len(newest["probabilities"]) == 3
    assert newest["labels"] == ["setosa", "versicolor", "virginica"]
    assert newest["time"].endswith("+00:00")


def test_prediction_log_stops_at_its_cap(home: Home, caplog: pytest.LogCaptureFixture) -> None:
    cap = 1500  # bytes: a few one-row records
    with (
        caplog.at_level(logging.WARNING, logger="kiln.monitor"),
        home.client(prediction_log_sample=1.0, prediction_log_max_mb=cap / (1 << 20)) as c,
    ):
        for i in range(20):
            assert predict(c, ROWS[i : i + 1]).status_code == 200
    stored = home.store().total_size(LOG_PREFIX)
    assert 0 < stored <= cap
    assert 0 < len(_log_lines(home)) < 20
    assert caplog.text.count("reached its cap") == 1


def test_prediction_log_sample_zero_writes_nothing(home: Home) -> None:
    with home.client(prediction_log_sample=0.0) as c:
        for i in range(5):
            assert predict(c, ROWS[i : i + 2]).status_code == 200
        assert c.get(f"{API}/deployments/iris/predictions").json()["items"] == []
    assert home.store().list(LOG_PREFIX) == []


# ---- metering and quotas --------------------------------------------------------------


def _usage(home: Home) -> dict[str, float]:
    """The project's prediction usage so far, as the database has it."""
    from kiln.monitor import usage

    with home.db() as s:
        totals = usage.summary(s, 1, start=None, end=None, group_by="total")["totals"]
        return {k: v for k, v in totals.items() if k.startswith("prediction_")}


def test_predictions_are_metered(home: Home) -> None:
    with home.client(monitor_flush_seconds=0.05) as c:
        assert project_id(c) == 1
        for n in (1, 2, 3, 4):
            assert predict(c, ROWS[:n]).status_code == 200
        assert predict(c, [{"nope": 1}]).status_code == 422  # refused: not metered
        wait_for(lambda: _usage(home).get("prediction_requests") == 4, timeout=10, what="4 metered")
        assert _usage(home)["prediction_rows"] == 10
    assert _usage(home) == {"prediction_requests": 4, "prediction_rows": 10}
    from kiln.store.tables import UsageEvent

    with home.db() as s:
        events = s.scalars(select(UsageEvent).where(UsageEvent.kind.like("prediction_%")))
        assert {e.subject for e in events} == {"iris"}


def test_a_prediction_rows_quota_refuses_the_eleventh_row(home: Home) -> None:
    from kiln.monitor import usage

    with home.db() as s:
        usage.set_quota(s, 1, "prediction_rows", "day", 10)
    with home.client() as c:
        for i in range(10):
            assert predict(c, ROWS[i : i + 1]).status_code == 200
        r = predict(c, ROWS[10:11])
        assert r.status_code == 429, r.text
        error = r.json()["error"]
        assert error["code"] == "quota_exceeded" and error["field"] == "prediction_rows"
        assert "prediction_rows per day is 10" in error["message"]
        v2 = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32"}]}
        v2["inputs"][0]["data"] = list(ROWS[0].values())
        r = c.post("/v2/models/iris/infer", json=v2)
        assert r.status_code == 429 and "prediction_rows" in r.json()["error"]
        w = manager(c).window(1, "iris")
        assert w["statuses"] == {"200": 10, "429": 2}
    assert _usage(home) == {"prediction_requests": 10, "prediction_rows": 10}
    with home.client(deploy=False) as c:  # restarted, it reads what was used
        assert predict(c, ROWS[:1]).status_code == 429
