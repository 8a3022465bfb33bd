"""Helpers of the dashboard tests: signing in through the real form, reading pages.

``Site`` is one in-process server (``create_app`` with its lifespan running) holding
two projects with data made in the test: ``alpha`` (a dataset whose column names and
values carry markup, jobs, model ``iris`` with compressed variants, a deployment
entry) and ``beta`` (the other tenant, whose resources alpha must never reach).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

API = "/api/v1"
MARKUP = '<script>alert("kiln")</script>'
"""Free text that reaches pages: a dataset's column name and values, a job's error
and log lines (model and dataset *names* are restricted to [A-Za-z0-9._-])."""

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
"""Screenshots of browser tests (git ignores the folder)."""

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def require_chromium() -> None:
    """Skip without Debian's Chromium, or fail where CI installed it
    (``KILN_REQUIRE_CHROMIUM=1``, set by .ci/run)."""
    if CHROMIUM.exists():
        return
    reason = f"Debian's chromium is not installed at {CHROMIUM} (.ci/run installs it)"
    if os.environ.get("KILN_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"{reason} (KILN_REQUIRE_CHROMIUM=1)", pytrace=False)
    pytest.skip(reason)


def admin_rest(url: str, admin_key: str) -> httpx.Client:
    """A REST client on ``url``'s ``/api/v1`` as the global admin."""
    return httpx.Client(
        base_url=url + "/api/v1", headers={"Authorization": f"Bearer {admin_key}"}, timeout=60
    )


def sign_in_page(page: Any, url: str, key: str) -> None:
    """Sign a browser tab in through the dashboard's form; it lands on the jobs list."""
    page.goto(url + "/")
    page.fill("input[name=key]", key)
    page.click("button[type=submit]")
    page.wait_for_url("**/jobs")


def screenshot(page: Any, name: str) -> Path:
    """A full-page screenshot of what a test checked, kept in test-artifacts/web/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def iris_train_spec(dataset: str, epochs: int, **train: Any) -> dict[str, Any]:
    """A small MLP on an uploaded iris dataset (``train`` overrides its train section)."""
    return {
        "name": "iris",
        "task": "classification",
        "data": {"source": dataset, "target": "target"},
        "model": {"type": "mlp", "hidden": [8]},
        "train": {"epochs": epochs, "device": "cpu", **train},
    }


_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    found = _CSRF.search(html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def post_forms(html: str) -> list[str]:
    """The inner HTML of every POST form on a page."""
    return re.findall(r'<form[^>]*method="post"[^>]*>(.*?)</form>', html, flags=re.S)


def external_urls(html: str, own: str) -> list[str]:
    """Every absolute http(s) URL on a page that does not point at the server itself."""
    return [u for u in re.findall(r"https?://[^\s\"'<>]+", html) if not u.startswith(own)]


def sign_in(client: TestClient, key: str, project: str | None = None) -> str:
    """Sign in through the login form (double-submit CSRF); the session's form token."""
    form = client.get("/login")
    assert form.status_code == 200, form.text
    r = client.post(
        "/login",
        data={"csrf": csrf_of(form.text), "key": key, "project": project or "", "next": "/jobs"},
    )
    assert r.status_code == 303 and r.headers["location"] == "/jobs", r.text
    page = client.get("/jobs")
    assert page.status_code == 200, page.text
    return csrf_of(page.text)


@dataclass
class Site:
    """The in-process server and what the tests know of its contents."""

    app: Any
    services: Any
    admin: str  # the global admin key
    keys: dict[str, str] = field(default_factory=dict)
    ids: dict[str, Any] = field(default_factory=dict)

    def client(self, *, https: bool = False) -> TestClient:
        """A browser of its own (its own cookie jar), redirects not followed."""
        base = "https://testserver" if https else "http://testserver"
        return TestClient(self.app, base_url=base, follow_redirects=False)

    def api(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        """A REST call (not entered as a context: that would run the lifespan again)."""
        client = self.client()
        try:
            headers = {"Authorization": f"Bearer {key or self.admin}"}
            return client.request(method, API + path, headers=headers, **kwargs)
        finally:
            client.close()
