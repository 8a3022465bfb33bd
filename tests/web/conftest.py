"""Fixtures of the dashboard tests: a populated in-process server (``site``), and for
the browser tests one headless Chromium (``browser``: a context shared by a module),
a fresh tab per test (``page``) that fails on console errors and leaves a screenshot
of a failed test in test-artifacts/web/."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
from web_support import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, MARKUP, Site, require_chromium


@pytest.fixture(scope="module")
def chromium() -> None:
    """Before a browser module's server starts: skip (or fail in CI) without Chromium.
    Browser modules name it in ``pytestmark`` (``usefixtures``)."""
    require_chromium()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item (``item.rep_call``) for fixtures to read."""
    outcome: Any = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium and one context for the module: its HTTP cache keeps
    plotly.js (4.8 MB) loaded once; each test starts with no cookies."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context = chromium.new_context(viewport={"width": 1280, "height": 900})
        yield context
        context.close()
        chromium.close()


@pytest.fixture
def console() -> list[str]:
    """The browser console's errors during a test (a test may take expected ones out)."""
    return []


@pytest.fixture
def page(browser: Any, console: list[str], request: pytest.FixtureRequest) -> Iterator[Any]:
    """A new tab, signed out; fails the test on any console error, and saves a
    screenshot when the test fails."""
    browser.clear_cookies()
    tab = browser.new_page()
    tab.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: console.append(str(e)))
    yield tab
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    tab.close()
    assert console == [], f"browser console errors: {console}"


def _table() -> bytes:
    """A small table whose column names and values carry markup."""
    frame = pd.DataFrame(
        {
            "x": [1.0, 2.0, None, 4.0, 5.0, 6.0],
            "color": ["red", "red", "blue", MARKUP, "red", None],
            MARKUP: [1, 2, 3, 4, 5, 6],
            "label": ["a", "b", "a", "b", "a", "b"],
        }
    )
    out = io.StringIO()
    frame.to_csv(out, index=False)
    return out.getvalue().encode()


def _report(name: str, size: int, p50: float, test: float) -> dict[str, Any]:
    """The parts of a compress variant's report that the dashboard reads."""
    return {
        "name": name,
        "model_bytes": size,
        "latency": {"batch1_p50_ms": p50, "batch1_p95_ms": p50 * 1.5},
        "metric": {"name": "accuracy", "test": test, "source_test": 0.9},
    }


def _populate(site: Site) -> None:
    from sqlalchemy import select

    from kiln.jobs import queue
    from kiln.lifecycle import JobState
    from kiln.store.registry import register_version
    from kiln.store.tables import JobLog, JobMetric, Project

    for name in ("alpha", "beta"):
        r = site.api("POST", "/projects", json={"name": name})
        assert r.status_code == 201, r.text
    scopes = {
        "alpha_read": ("alpha", ["read"]),
        "alpha_train": ("alpha", ["read", "train"]),
        "alpha_deploy": ("alpha", ["read", "deploy"]),
        "alpha_admin": ("alpha", ["admin"]),
        "alpha_predict": ("alpha", ["predict"]),
        "beta_admin": ("beta", ["admin"]),
    }
    for name, (project, granted) in scopes.items():
        r = site.api("POST", "/keys", json={"project": project, "scopes": granted, "name": name})
        assert r.status_code == 201, r.text
        site.keys[name] = r.json()["key"]
    for project, filename, data in (
        ("alpha", "markup.csv", _table()),
        ("beta", "beta_secret_table.csv", b"a,b\n1,2\n3,4\n"),
    ):
        r = site.api(
            "POST",
            "/datasets",
            params={"project": project},
            files={"file": (filename, data, "text/csv")},
        )
        assert r.status_code == 201, r.text
        site.ids[f"{project}_dataset"] = r.json()["id"]

    spec = {"name": "iris", "data": {"source": f"dataset:{site.ids['alpha_dataset']}"}}
    with site.services.db.session() as s:
        alpha = s.scalars(select(Project).where(Project.name == "alpha")).one()
        beta = s.scalars(select(Project).where(Project.name == "beta")).one()
        site.ids |= {"alpha": alpha.id, "beta": beta.id}
        running = queue.new_job(s, alpha, "train", spec, max_attempts=3)
        running.state, running.attempts = JobState.running, 1
        running.progress = {"epoch": 3, "epochs": 10}
        for epoch in (1, 2, 3):
            data = {"train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "val_accuracy": 0.3 * epoch}
            s.add(JobMetric(job_id=running.id, attempt=1, epoch=epoch, data=data))
        failed = queue.new_job(s, alpha, "train", spec, max_attempts=1)
        failed.state = JobState.failed
        failed.error = {"code": "invalid_data", "message": f"no column {MARKUP}", "field": None}
        s.add(JobLog(job_id=failed.id, attempt=1, level="error", message=f"failed: {MARKUP}"))
        other = queue.new_job(s, beta, "train", {"name": "beta_secret_model"}, max_attempts=1)
        s.flush()
        common = {"task": "classification", "artifact_key": "none"}
        v1 = register_version(
            s,
            alpha,
            "iris",
            **common,
            metrics={"test": {"accuracy": 0.9}},
            summary={"model": "mlp"},
            size_bytes=40_000,
            job_id=running.id,
            dataset_id=site.ids["alpha_dataset"],
        )
        parent = v1
        for name, size, p50, test in (("int8", 12_000, 0.2, 0.89), ("pruned", 20_000, 0.5, 0.86)):
            parent = register_version(
                s,
                alpha,
                "iris",
                **common,
                metrics={"test": {"accuracy": test}},
                summary={"model": "mlp", "variant": name, "report": _report(name, size, p50, test)},
                size_bytes=size,
                job_id=failed.id,
                dataset_id=site.ids["alpha_dataset"],
                parent_id=parent.id,
            )
        register_version(
            s,
            beta,
            "beta_secret_model",
            **common,
            metrics={},
            summary={},
            size_bytes=1,
            job_id=other.id,
            dataset_id=site.ids["beta_dataset"],
        )
        site.ids |= {"running_job": running.id, "failed_job": failed.id, "beta_job": other.id}

    from kiln.lifecycle import DeploymentState
    from kiln.serve.deployments import Live
    from kiln.store.deployments import DeploymentConfig

    # deployment entries without loaded models: enough for pages, forms and tenancy
    manager = site.app.state.deployments
    for project, name, model in (("alpha", "alpha-dep", "iris"), ("beta", "beta-secret-dep", "x")):
        live = Live(site.ids[project], name, model, state=DeploymentState.ready)
        live.config = DeploymentConfig(backend="torch", max_batch_size=8)
        manager.live[(site.ids[project], name)] = live


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A server with projects alpha and beta populated as ``web_support`` describes."""
    from fastapi.testclient import TestClient

    from kiln.app import build_services, create_app
    from kiln.server import bootstrap
    from kiln.settings import Settings

    settings = Settings(home=tmp_path_factory.mktemp("web") / "home")
    services = build_services(settings)
    admin = bootstrap(services)
    assert admin is not None
    app = create_app(settings, services=services)
    with TestClient(app):  # runs the lifespan: app.state.deployments
        built = Site(app=app, services=services, admin=admin)
        _populate(built)
        yield built
        app.state.deployments.live.clear()
    services.db.dispose()
