"""The dashboard in a real browser: Playwright driving Debian's Chromium, headless,
against a real kiln server on 127.0.0.1 with a worker thread, so jobs really train.

Without /usr/bin/chromium the tests skip, saying so (or fail, where CI installed it).
A failing test leaves a screenshot in ``test-artifacts/web/<test>.png``. Pages are
held to their Content-Security-Policy: any console error (a blocked script, a failed
request) fails the test. Waits poll ``page.evaluate`` from Python, because
Playwright's ``wait_for_function`` evaluates strings, which the CSP forbids.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from web_support import admin_rest, iris_train_spec, sign_in_page

from cli.live_server import Platform, running_platform
from support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("chromium")]  # a live server


class Server:
    """The running platform, a REST client on it, and what the fixture made."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.url = platform.url
        self.rest = admin_rest(platform.url, platform.admin_key)
        self.dataset = ""

    def job_state(self, job_id: str) -> str:
        state: str = self.rest.get(f"/jobs/{job_id}").json()["state"]
        return state


def _iris_csv() -> bytes:
    from sklearn.datasets import load_iris

    return load_iris(as_frame=True).frame.to_csv(index=False).encode()


def _fast_metering() -> dict[str, Any]:
    """Write counted predictions every 0.2 s (the setting exists once metering does)."""
    from kiln.settings import Settings

    return (
        {"monitor_flush_seconds": 0.2} if "monitor_flush_seconds" in Settings.model_fields else {}
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """kiln with model ``iris`` v1 and v2 trained from an uploaded dataset, v1 deployed."""
    home = tmp_path_factory.mktemp("web-live")
    with running_platform(home, **_fast_metering()) as platform:
        s = Server(platform)
        r = s.rest.post("/datasets", files={"file": ("iris.csv", _iris_csv(), "text/csv")})
        assert r.status_code == 201, r.text
        s.dataset = r.json()["ref"]
        jobs = [s.rest.post("/jobs", json={"kind": "train", "spec": iris_train_spec(s.dataset, 2)})]
        jobs.append(
            s.rest.post("/jobs", json={"kind": "train", "spec": iris_train_spec(s.dataset, 2)})
        )
        for job in jobs:
            assert job.status_code == 201, job.text
            wait_for(
                lambda j=job: s.job_state(j.json()["id"]) == "succeeded",
                what="training",
                timeout=120,
            )
        deploy = {"name": "iris", "model": "iris", "version": 1, "backend": "torch"}
        r = s.rest.post("/deployments", json=deploy)
        assert r.status_code == 201, r.text
        try:
            yield s
        finally:
            for job in s.rest.get("/jobs", params={"state": "running"}).json()["items"]:
                s.rest.post(f"/jobs/{job['id']}/cancel")  # the platform drains before it stops
            s.rest.close()


def plotted(page: Any, chart: str) -> int:
    """How many points the chart's first trace holds, as plotly.js drew it."""
    count: int = page.evaluate(
        "(id) => { const d = document.getElementById(id).data;"
        " return d && d.length ? d[0].x.length : 0; }",
        chart,
    )
    return count


def test_sign_in_refuses_a_wrong_key_without_saying_why(
    page: Any, server: Server, console: list[str]
) -> None:
    page.goto(server.url + "/jobs")
    assert "/login?next=%2Fjobs" in page.url
    key = server.platform.admin_key
    page.fill("input[name=key]", key[:-1] + ("B" if key.endswith("A") else "A"))
    page.click("button[type=submit]")
    alert = page.locator("[role=alert]")
    alert.wait_for()
    assert alert.inner_text().startswith("Sign-in refused")
    assert "secret" not in alert.inner_text()
    assert len(console) == 1 and "401" in console[0], console
    console.clear()  # the refused sign-in's own answer, as expected
    page.fill("input[name=key]", key)
    page.click("button[type=submit]")
    page.wait_for_url("**/jobs")
    assert page.locator("header .who").inner_text().startswith("default")


def test_the_loss_curve_grows_while_the_job_trains(page: Any, server: Server) -> None:
    spec = iris_train_spec(server.dataset, 2000, batch_size=4)
    job = server.rest.post("/jobs", json={"kind": "train", "spec": spec}).json()["id"]
    try:
        sign_in_page(page, server.url, server.platform.admin_key)
        wait_for(lambda: server.job_state(job) == "running", what="the job to start")
        page.goto(f"{server.url}/jobs/{job}")
        first = wait_for(lambda: plotted(page, "loss-chart"), what="a first point")

        def grown() -> int | None:
            now = plotted(page, "loss-chart")
            return now if now > first else None

        assert wait_for(grown, what="more points, drawn by the page's polling") > first
        assert plotted(page, "validation-chart") > 0
        page.click("#cancel-form button")
        page.locator("#job-state .badge", has_text="cancelled").wait_for(timeout=20_000)
        assert server.job_state(job) == "cancelled"
    finally:
        if server.job_state(job) in ("queued", "running"):
            server.rest.post(f"/jobs/{job}/cancel")


def test_model_lineage_links_dataset_job_and_version(page: Any, server: Server) -> None:
    sign_in_page(page, server.url, server.platform.admin_key)
    page.goto(server.url + "/models/iris")
    page.click("#versions a[href='/models/iris/versions/1']")
    page.wait_for_url("**/models/iris/versions/1")
    lineage = page.locator("#lineage")
    dataset_id = server.dataset.removeprefix("dataset:")
    links = [a.get_attribute("href") for a in lineage.locator("a").all()]
    assert links[0] == f"/datasets/{dataset_id}"
    assert links[1].startswith("/jobs/job_")
    assert lineage.locator("li.current").inner_text().startswith("version v1")
    lineage.locator("a").nth(1).click()
    page.wait_for_url("**/jobs/job_*")
    assert page.locator("#job-state .badge").inner_text() == "succeeded"
    assert plotted(page, "loss-chart") == 2  # two epochs
    page.click(f"a[href='/datasets/{dataset_id}']")
    assert page.locator("#row-count").inner_text() == "150"


def test_the_compression_chart_draws(page: Any, server: Server) -> None:
    from kiln.store.registry import get_model, register_version, resolve_version
    from kiln.store.tables import Project

    report = {
        "model_bytes": 1200,
        "latency": {"batch1_p50_ms": 0.05},
        "metric": {"name": "accuracy", "test": 0.9, "source_test": 0.93},
    }
    with server.platform.services.db.session() as s:
        project = s.get(Project, 1)
        source = resolve_version(s, get_model(s, project, "iris"), 2)
        register_version(
            s,
            project,
            "iris",
            artifact_key=source.artifact_key,
            task=source.task,
            metrics=source.metrics,
            summary={"variant": "int8", "report": report},
            size_bytes=1200,
            parent_id=source.id,
        )
    sign_in_page(page, server.url, server.platform.admin_key)
    page.goto(server.url + "/models/iris")
    assert wait_for(lambda: plotted(page, "pareto-chart"), what="the Pareto chart") == 1
    assert page.locator("#pareto-chart svg.main-svg").count() > 0


def test_canary_weights_change_through_the_form(page: Any, server: Server) -> None:
    sign_in_page(page, server.url, server.platform.admin_key)
    page.goto(server.url + "/deployments/iris")
    page.select_option("select[name=version_1]", "2")
    page.fill("input[name=weight_0]", "90")
    page.fill("input[name=weight_1]", "10")
    page.click("#routes-form button[type=submit]")  # answers once v2 is loaded and warm
    page.locator("#routes tr[data-version='2']").wait_for()
    routes = server.rest.get("/deployments/iris").json()["routes"]
    assert {r["version"]: r["weight"] for r in routes} == {1: 90, 2: 10}
    assert page.locator("#routes tr[data-version='1'] .weight").inner_text() == "90"


def test_usage_counts_the_predictions_just_made(page: Any, server: Server) -> None:
    row = {
        "sepal length (cm)": 5.1,
        "sepal width (cm)": 3.5,
        "petal length (cm)": 1.4,
        "petal width (cm)": 0.2,
    }
    sign_in_page(page, server.url, server.platform.admin_key)
    before = usage_totals(page, server)
    for _ in range(7):
        r = server.rest.post("/deployments/iris/predict", json={"inputs": [row, row]})
        assert r.status_code == 200, r.text
    wanted = before.get("prediction_requests", 0) + 7

    def counted() -> dict[str, float] | None:
        totals = usage_totals(page, server)  # the page, reloaded
        return totals if totals.get("prediction_requests", 0) >= wanted else None

    after = wait_for(counted, what="the usage page to count the predictions", timeout=15)
    assert after["prediction_requests"] == wanted
    assert after["prediction_rows"] == before.get("prediction_rows", 0) + 14
    assert wait_for(lambda: plotted(page, "usage-chart-1"), what="a usage chart")


def usage_totals(page: Any, server: Server) -> dict[str, float]:
    """The usage page's totals for the last 30 days, by kind."""
    page.goto(server.url + "/usage")
    out = {}
    for row in page.locator("#usage-totals tr").all():
        out[row.get_attribute("data-kind")] = float(row.locator("td").inner_text().split()[0])
    return out
