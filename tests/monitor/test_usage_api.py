"""Usage metering and quotas through the REST API, in process: what jobs, uploads and
registrations record; the usage summary; quotas set by a global admin and enforced."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from kiln.app import build_services, create_app
from kiln.jobs.worker import Worker
from kiln.monitor import usage
from kiln.server import bootstrap
from kiln.settings import Settings
from kiln.store.tables import AuditEvent, Dataset, UsageEvent

API = "/api/v1"


@functools.cache
def iris_csv() -> bytes:
    from sklearn.datasets import load_iris

    return load_iris(as_frame=True).frame.to_csv(index=False).encode()


def spec(source: str, target: str = "target") -> dict[str, Any]:
    return {
        "name": "iris",
        "task": "classification",
        "data": {"source": source, "target": target},
        "model": {"type": "linear"},
        "train": {"epochs": 2, "device": "cpu"},
    }


class Server:
    """One in-process server: the bootstrap admin key, project ``other`` and its keys."""

    def __init__(self, home: Path, **settings: Any) -> None:
        self.settings = Settings(home=home, **settings)
        self.svc = build_services(self.settings)
        admin = bootstrap(self.svc)
        assert admin is not None
        self.admin = admin
        self.http = TestClient(create_app(self.settings, services=self.svc))
        assert self.call("POST", "/projects", admin, json={"name": "other"}).status_code == 201
        self.keys = {
            scopes: self.call(
                "POST", "/keys", admin, json={"project": project, "scopes": scopes.split("+")}
            ).json()["key"]
            for project, scopes in (("default", "admin"), ("default", "read+train"))
        }
        self.other = self.call(
            "POST", "/keys", admin, json={"project": "other", "scopes": ["admin"]}
        ).json()["key"]

    def call(self, method: str, path: str, key: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return self.http.request(method, API + path, headers=headers, **kwargs)

    def upload(self, key: str, data: bytes, **params: Any) -> httpx.Response:
        files = {"file": ("iris.csv", data, "text/csv")}
        return self.call("POST", "/datasets", key, files=files, params=params)

    def quota(self, kind: str, limit: float | None, period: str = "day", **body: Any) -> None:
        body = {"kind": kind, "period": period, "limit": limit, **body}
        r = self.call("PUT", "/quotas", self.admin, json=body)
        assert r.status_code == 200, r.text

    def run_jobs(self) -> None:
        Worker(self.settings, db=self.svc.db, store=self.svc.store).run(until_idle=True)

    def count(self, table: Any, *where: Any) -> int:
        with self.svc.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(table).where(*where)) or 0)

    def close(self) -> None:
        self.http.close()
        self.svc.db.dispose()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    made = Server(tmp_path / "home", data_roots=[tmp_path / "roots"])
    yield made
    made.close()


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert set(body) == {"code", "message", "field"}
    return body


def test_jobs_uploads_and_versions_are_metered_and_quotas_refuse_past_the_limit(
    server: Server,
) -> None:
    trainer = server.keys["read+train"]
    r = server.upload(trainer, iris_csv())
    assert r.status_code == 201, r.text
    ref = r.json()["ref"]
    good = server.call("POST", "/jobs", trainer, json={"kind": "train", "spec": spec(ref)})
    # passes the checks at submission, fails on the worker: the column holds no image paths
    broken = spec(ref)
    broken["data"]["image"] = "sepal length (cm)"
    broken["model"] = {"type": "cnn", "channels": [4], "hidden": [8]}
    bad = server.call("POST", "/jobs", trainer, json={"kind": "train", "spec": broken})
    assert good.status_code == bad.status_code == 201
    server.run_jobs()

    job = server.call("GET", f"/jobs/{good.json()['id']}", trainer).json()
    assert job["state"] == "succeeded"
    res = job["resources"]
    assert res["wall_seconds"] > 0 and res["cpu_seconds"] > 0 and res["peak_rss_bytes"] > 0
    assert res["device"] == "cpu" and "gpu_peak_bytes" not in res
    assert [(a["attempt"], a["state"]) for a in res["attempts"]] == [(1, "succeeded")]
    failed = server.call("GET", f"/jobs/{bad.json()['id']}", trainer).json()
    assert failed["state"] == "failed" and failed["resources"]["attempts"][0]["state"] == "failed"

    version = server.call("GET", "/models/iris/versions/1", trainer).json()
    doc = server.call("GET", "/usage", trainer, params={"group_by": "total"}).json()
    assert doc["project"] == "default" and doc["group_by"] == "total"
    # a failed attempt used the machine too
    compute = res["wall_seconds"] + failed["resources"]["wall_seconds"]
    assert doc["totals"]["compute_seconds"] == pytest.approx(compute, abs=0.01)
    assert doc["totals"]["stored_bytes"] == len(iris_csv()) + version["size_bytes"]
    assert {(i["kind"], i["device"]) for i in doc["items"]} == {
        ("compute_seconds", "cpu"),
        ("stored_bytes", ""),
    }
    with server.svc.db.session() as s:
        subjects = s.scalars(
            select(UsageEvent.subject).where(UsageEvent.kind == "stored_bytes")
        ).all()
    assert sorted(subjects) == sorted([ref.removeprefix("dataset:"), version["id"]])

    # compute quota: submission is refused once the period's compute is used up
    server.quota("compute_seconds", 3600, "month")
    assert server.call(
        "POST", "/jobs", trainer, json={"kind": "train", "spec": spec(ref)}
    ).is_success
    server.quota("compute_seconds", compute / 2, "month")
    jobs_before = server.call("GET", "/jobs", trainer).json()["total"]
    refused = server.call("POST", "/jobs", trainer, json={"kind": "train", "spec": spec(ref)})
    body = error(refused, 429)
    assert body["code"] == "quota_exceeded" and body["field"] == "compute_seconds"
    assert body["message"].startswith(
        f"quota exceeded: compute_seconds per month is {usage.number(compute / 2)}; "
    )
    assert server.call("GET", "/jobs", trainer).json()["total"] == jobs_before
    with server.svc.db.session() as s:
        audit = s.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())).first()
    assert audit is not None
    assert (audit.action, audit.outcome, audit.status) == ("jobs.submit", "quota_exceeded", 429)

    quotas = server.call("GET", "/usage", trainer).json()["quotas"]
    assert quotas == [
        {
            "project": "default",
            "kind": "compute_seconds",
            "period": "month",
            "limit": pytest.approx(compute / 2),
            "used": pytest.approx(compute, abs=0.01),
        }
    ]
    server.quota("compute_seconds", None, "month")  # removed: submissions pass again
    assert server.call(
        "POST", "/jobs", trainer, json={"kind": "train", "spec": spec(ref)}
    ).is_success


def test_a_stored_bytes_quota_refuses_uploads_and_imports_before_storing_anything(
    server: Server, tmp_path: Path
) -> None:
    trainer = server.keys["read+train"]
    server.quota("stored_bytes", len(iris_csv()) + 10, "total")
    assert server.upload(trainer, iris_csv()).status_code == 201
    artifacts = Path(server.settings.resolved_artifacts)
    stored = sorted(p for p in artifacts.rglob("*") if p.is_file())

    body = error(server.upload(trainer, iris_csv()), 429)
    assert body["code"] == "quota_exceeded" and body["field"] == "stored_bytes"
    assert (
        f"stored_bytes in total is {len(iris_csv()) + 10}; {len(iris_csv())} used"
        in (body["message"])
    )
    assert f"this needs {len(iris_csv())} more" in body["message"]
    roots = tmp_path / "roots"
    roots.mkdir()
    (roots / "iris.csv").write_bytes(iris_csv())
    imported = server.call(
        "POST", "/datasets/import", trainer, json={"name": "iris", "uri": str(roots / "iris.csv")}
    )
    assert error(imported, 429)["code"] == "quota_exceeded"
    assert sorted(p for p in artifacts.rglob("*") if p.is_file()) == stored
    assert server.count(Dataset) == 1
    assert server.count(UsageEvent) == 1

    # another project's quota is its own
    assert server.upload(server.other, iris_csv()).status_code == 201


def _seed(server: Server) -> None:
    events = [
        ("2025-01-31T23:30:00", "compute_seconds", 10.0, "cpu"),
        ("2025-02-01T00:00:00", "compute_seconds", 20.0, "cuda"),
        ("2025-02-01T12:00:00", "compute_seconds", 5.0, "cpu"),
        ("2025-02-01T12:00:00", "stored_bytes", 1000.0, ""),
        ("2025-03-15T08:00:00", "prediction_rows", 7.0, ""),
    ]
    with server.svc.db.session() as s:
        for when, kind, quantity, device in events:
            at = datetime.fromisoformat(when).replace(tzinfo=UTC)
            usage.record(s, 1, kind, quantity, device=device, time=at)
        usage.record(
            s, 2, "compute_seconds", 99.0, device="cpu", time=datetime(2025, 2, 1, tzinfo=UTC)
        )


def _items(doc: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    return [(i["period"], i["kind"], i["device"], i["quantity"]) for i in doc["items"]]


def test_the_summary_groups_by_day_month_or_total_within_from_and_to(server: Server) -> None:
    _seed(server)
    reader = server.keys["read+train"]

    def get(**params: Any) -> dict[str, Any]:
        r = server.call("GET", "/usage", reader, params=params)
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    by_day = get(group_by="day")
    assert _items(by_day) == [
        ("2025-01-31", "compute_seconds", "cpu", 10.0),
        ("2025-02-01", "compute_seconds", "cpu", 5.0),
        ("2025-02-01", "compute_seconds", "cuda", 20.0),
        ("2025-02-01", "stored_bytes", "", 1000.0),
        ("2025-03-15", "prediction_rows", "", 7.0),
    ]
    assert by_day["totals"] == {
        "compute_seconds": 35.0,
        "stored_bytes": 1000.0,
        "prediction_rows": 7.0,
    }
    by_month = get(group_by="month", **{"from": "2025-02-01", "to": "2025-03-15"})
    assert _items(by_month) == [
        ("2025-02", "compute_seconds", "cpu", 5.0),
        ("2025-02", "compute_seconds", "cuda", 20.0),
        ("2025-02", "stored_bytes", "", 1000.0),
    ]  # from is inclusive, to exclusive
    assert by_month["from"] == "2025-02-01T00:00:00Z" and by_month["to"] == "2025-03-15T00:00:00Z"
    total = get(group_by="total", **{"from": "2025-01-31T23:00:00+00:00", "to": "2025-02-01T06:00"})
    assert _items(total) == [
        ("total", "compute_seconds", "cpu", 10.0),
        ("total", "compute_seconds", "cuda", 20.0),
    ]
    # an admin key of another project sees its own usage only, and not this project's
    other = server.call("GET", "/usage", server.other, params={"group_by": "total"}).json()
    assert (other["project"], other["totals"]) == ("other", {"compute_seconds": 99.0})
    denied = server.call("GET", "/usage", server.other, params={"project": "default"})
    assert error(denied, 404)["field"] == "project"
    # the global admin key picks the project
    seen = server.call("GET", "/usage", server.admin, params={"project": "other"}).json()
    assert seen["totals"] == {"compute_seconds": 99.0}

    for params, field in (
        ({"from": "yesterday"}, "from"),
        ({"to": "2025-13-01"}, "to"),
        ({"from": "2025-02-02", "to": "2025-02-01"}, "to"),
        ({"group_by": "week"}, "group_by"),
    ):
        body = error(server.call("GET", "/usage", reader, params=params), 422)
        assert body["field"] == field, body


def test_only_a_global_admin_sets_quotas_and_any_reader_lists_its_projects(
    server: Server,
) -> None:
    body = {"kind": "compute_seconds", "period": "day", "limit": 60}
    for key in (server.keys["admin"], server.keys["read+train"], server.other):
        assert error(server.call("PUT", "/quotas", key, json=body), 403)["code"] == "forbidden"
    r = server.call("PUT", "/quotas", server.admin, json={**body, "project": "other"})
    assert r.json() == {**body, "project": "other", "limit": 60.0, "used": 0.0}
    server.quota("stored_bytes", 1e6, "total")  # the default project
    assert server.call("GET", "/quotas", server.other).json() == [
        {"project": "other", "kind": "compute_seconds", "period": "day", "limit": 60.0, "used": 0.0}
    ]
    assert [q["kind"] for q in server.call("GET", "/quotas", server.keys["read+train"]).json()] == [
        "stored_bytes"
    ]
    for bad, field in (
        ({"kind": "gpus"}, "kind"),
        ({"period": "week"}, "period"),
        ({"limit": -1}, "limit"),
        ({"project": "nope"}, "project"),
        ({"colour": "red"}, "colour"),
    ):
        answer = server.call("PUT", "/quotas", server.admin, json={**body, **bad})
        assert error(answer, 404 if field == "project" else 422)["field"] == field
    # removing: limit null; twice is fine
    for _ in range(2):
        r = server.call(
            "PUT", "/quotas", server.admin, json={**body, "project": "other", "limit": None}
        )
        assert r.status_code == 200 and r.json()["limit"] is None
    assert server.call("GET", "/quotas", server.other).json() == []
    with server.svc.db.session() as s:
        actions = s.scalars(select(AuditEvent.outcome).where(AuditEvent.action == "quotas.set"))
        assert "forbidden" in list(actions)
