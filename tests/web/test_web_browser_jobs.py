"""The jobs pages and the usage page in a real browser (issue #15): a job page that fills
in its outcome when the job ends, without a reload; an early-stopped job's full bar;
the measured resources; results as tables and a heat map; the jobs list's name and
variants columns; usage in the CLI's units.

Playwright drives Debian's Chromium against a real kiln server with a worker thread,
as in test_web_browser.py; each test saves a screenshot of the page it checks in
``test-artifacts/web/jobs-*.png`` (git ignores the folder).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from web_support import admin_rest, iris_train_spec, screenshot, sign_in_page

from cli.live_server import Platform, running_platform
from support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("chromium")]  # a live server


class Server:
    """The running platform and a REST client on it (the global admin key)."""

    def __init__(self, platform: Platform, dataset: str) -> None:
        self.platform = platform
        self.url = platform.url
        self.dataset = dataset
        self.rest = admin_rest(platform.url, platform.admin_key)

    def submit(self, kind: str, spec: dict[str, Any]) -> str:
        r = self.rest.post("/jobs", json={"kind": kind, "spec": spec})
        assert r.status_code == 201, r.text
        job_id: str = r.json()["id"]
        return job_id

    def state(self, job_id: str) -> str:
        state: str = self.rest.get(f"/jobs/{job_id}").json()["state"]
        return state

    def finish(self, job_id: str, timeout: float = 120) -> None:
        final = ("succeeded", "failed", "cancelled")
        wait_for(lambda: self.state(job_id) in final, what=f"job {job_id}", timeout=timeout)
        assert self.state(job_id) == "succeeded", self.rest.get(f"/jobs/{job_id}").json()


def early_stopping_spec(dataset: str) -> dict[str, Any]:
    """30 epochs asked for; no epoch after the first improves train_loss by 100, so
    early stopping ends the run after the first and two more."""
    stop = {"metric": "train_loss", "patience": 2, "min_delta": 100.0}
    return iris_train_spec(dataset, 30, early_stopping=stop)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from sklearn.datasets import load_iris

    data = load_iris(as_frame=True).frame.to_csv(index=False).encode()
    with running_platform(tmp_path_factory.mktemp("web-jobs")) as platform:
        rest = admin_rest(platform.url, platform.admin_key)
        r = rest.post("/datasets", files={"file": ("iris.csv", data, "text/csv")})
        rest.close()
        assert r.status_code == 201, r.text
        s = Server(platform, r.json()["ref"])
        try:
            yield s
        finally:
            for job in s.rest.get("/jobs", params={"state": "running"}).json()["items"]:
                s.rest.post(f"/jobs/{job['id']}/cancel")  # the platform drains before it stops
            s.rest.close()


def test_the_job_page_fills_in_the_outcome_when_the_job_ends(page: Any, server: Server) -> None:
    # one worker: a long job holds it, so the page opens while ours is still queued
    blocker = server.submit("train", iris_train_spec(server.dataset, 2000, batch_size=4))
    wait_for(lambda: server.state(blocker) == "running", what="the blocking job to start")
    job = server.submit("train", early_stopping_spec(server.dataset))
    sign_in_page(page, server.url, server.platform.admin_key)
    page.goto(f"{server.url}/jobs/{job}")
    assert page.locator("#job-state .badge").inner_text() == "queued"
    assert page.locator("#job-finished").inner_text() == "—"
    assert page.locator("#job-results table").count() == 0
    page.evaluate("() => { document.body.dataset.opened = 'once'; }")  # gone on a reload
    server.rest.post(f"/jobs/{blocker}/cancel")

    page.locator("#job-version a").wait_for(timeout=120_000)  # filled in by the poll
    assert page.evaluate("() => document.body.dataset.opened") == "once"  # no reload
    assert page.locator("#job-state .badge").inner_text() == "succeeded"
    assert page.locator("#job-finished").inner_text() != "—"
    assert page.locator("#job-version a").get_attribute("href") == "/models/iris/versions/1"
    text = page.locator("#job-progress-text").inner_text()
    assert re.fullmatch(r"stopped early at [1-9]\d*/30 epochs", text), text
    bar = page.locator("#job-progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == "30"
    facts = page.locator("#job-resources dl").inner_text()
    for label in ("wall time", "CPU time", "peak memory", "device"):
        assert label in facts
    assert re.search(r"peak memory\s+\d+\.\d (MiB|GiB)", facts), facts
    assert page.locator("#job-results table.metrics").count() >= 1
    screenshot(page, "jobs-live-finished")


def test_results_are_a_metric_table_and_a_confusion_heat_map(page: Any, server: Server) -> None:
    job = server.submit("train", iris_train_spec(server.dataset, 3))
    server.finish(job)
    sign_in_page(page, server.url, server.platform.admin_key)
    page.goto(f"{server.url}/jobs/{job}")
    table = page.locator("#job-results table.metrics")
    assert table.locator("thead th").all_text_contents()[1:] == ["test", "val"]
    assert table.locator("tr[data-metric=accuracy] td").count() == 2
    heat = page.locator("#job-results table.heatmap").first
    cells = heat.locator("tbody td")
    assert cells.count() == 9  # three classes
    total = sum(int(t) for t in cells.all_inner_texts())
    assert total > 0
    shaded = cells.first.evaluate("td => getComputedStyle(td).backgroundColor")
    assert shaded.startswith("rgb"), shaded
    assert page.locator("#job-results pre.json").count() == 0  # nothing left as raw JSON
    height = page.evaluate("() => document.documentElement.scrollHeight")
    assert height < 2500, height  # the result no longer runs to thousands of pixels
    screenshot(page, "jobs-results")


def test_the_jobs_list_names_jobs_and_shows_a_compress_jobs_variants(
    page: Any, server: Server
) -> None:
    trained = server.submit("train", iris_train_spec(server.dataset, 3))
    server.finish(trained)
    version = server.rest.get(f"/jobs/{trained}").json()["model_version"]["version"]
    steps = [
        {"prune": {"method": "structured", "amount": 0.5, "finetune_epochs": 1}},
        {"quantize": {"method": "int8_dynamic", "backend": "onnxruntime"}},
    ]
    spec = {
        "source": f"model:iris@{version}",
        "steps": steps,
        "tolerance": {"metric": "accuracy", "max_drop": 1.0},
    }
    squeeze = server.submit("compress", spec)
    server.finish(squeeze, timeout=180)
    variants = server.rest.get(f"/jobs/{squeeze}").json()["result"]["variants"]
    sign_in_page(page, server.url, server.platform.admin_key)
    page.goto(server.url + "/jobs")
    row = page.locator(f"#jobs tr[data-job={squeeze}]")
    assert row.locator("td.name").inner_text() == "iris"
    links = row.locator("td.versions a").evaluate_all("as => as.map(a => a.getAttribute('href'))")
    assert links == [f"/models/iris/versions/{v['version']}" for v in variants]
    assert page.locator(f"#jobs tr[data-job={trained}] td.name").inner_text() == "iris"
    screenshot(page, "jobs-list")


def test_usage_reads_in_hours_bytes_and_thousands(page: Any, server: Server) -> None:
    from kiln.monitor.usage import record, set_quota

    with server.platform.services.db.session() as s:
        record(s, 1, "compute_seconds", 36_000.0, device="cpu")
        record(s, 1, "prediction_requests", 1e6)
        set_quota(s, 1, "prediction_requests", "month", 2e6)
    sign_in_page(page, server.url, server.platform.admin_key)
    page.goto(server.url + "/usage")
    totals = {
        row.get_attribute("data-kind"): row.locator("td").inner_text()
        for row in page.locator("#usage-totals tr").all()
    }
    assert totals["prediction_requests"] == "1,000,000"
    assert re.fullmatch(r"10\.\d h", totals["compute_seconds"]), totals
    assert re.fullmatch(r"\d+\.\d (KiB|MiB)", totals["stored_bytes"]), totals
    quota = page.locator("#usage-quotas tr[data-kind=prediction_requests]")
    assert quota.locator("td.used").inner_text() == "1,000,000"
    assert quota.locator("td.limit").inner_text() == "2,000,000"
    screenshot(page, "jobs-usage")
