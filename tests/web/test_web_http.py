"""The dashboard over plain HTTP: sign-in, sessions, CSRF, tenancy, escaping, assets."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from web_support import MARKUP, Site, csrf_of, external_urls, post_forms, sign_in

REFUSED = "Sign-in refused"


def signed_in_get(site: Site, key: str, path: str, project: str | None = None) -> Any:
    client = site.client()
    sign_in(client, key, project)
    return client.get(path)


def figure(html: str, chart: str) -> dict[str, Any]:
    found = re.search(rf'<script type="application/json" id="{chart}-data">(.*?)</script>', html)
    assert found, f"no figure {chart} on the page"
    data: dict[str, Any] = json.loads(found.group(1))
    return data


# ---- signing in --------------------------------------------------------------------


def test_a_wrong_key_is_refused_with_one_generic_message(site: Site) -> None:
    good = site.keys["alpha_read"]
    key_id, secret = good.split("_")[1], good.split("_", 2)[2]
    revoked = site.api("POST", "/keys", json={"project": "alpha", "scopes": ["read"]}).json()
    site.api("DELETE", f"/keys/{revoked['id']}")
    attempts = [
        ("kiln_0123456789abcdef_" + secret, None),  # unknown id
        (f"kiln_{key_id}_" + "A" * 43, None),  # wrong secret
        ("not a key", None),  # malformed
        (revoked["key"], None),  # revoked
        (good, "beta"),  # a project key naming another project
        (site.admin, "no-such-project"),  # a global key naming a missing project
    ]
    messages = set()
    for key, project in attempts:
        client = site.client()
        form = client.get("/login")
        r = client.post(
            "/login", data={"csrf": csrf_of(form.text), "key": key, "project": project or ""}
        )
        assert r.status_code == 401, (key, project)
        assert "kiln_session" not in r.headers.get("set-cookie", "")
        messages.add(re.search(r'role="alert">([^<]*)<', r.text).group(1))  # type: ignore[union-attr]
        assert client.get("/jobs").status_code == 303  # still signed out
    assert len(messages) == 1 and REFUSED in messages.pop()


def test_a_key_without_read_scope_cannot_sign_in(site: Site) -> None:
    client = site.client()
    form = client.get("/login")
    r = client.post("/login", data={"csrf": csrf_of(form.text), "key": site.keys["alpha_predict"]})
    assert r.status_code == 403 and "read" in r.text
    assert client.get("/jobs").status_code == 303


@pytest.mark.parametrize("https", [False, True])
def test_session_cookie_flags(site: Site, https: bool) -> None:
    client = site.client(https=https)
    form = client.get("/login")
    login_cookie = form.headers["set-cookie"]
    assert "HttpOnly" in login_cookie and "SameSite=strict" in login_cookie
    r = client.post("/login", data={"csrf": csrf_of(form.text), "key": site.keys["alpha_read"]})
    assert r.status_code == 303
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("kiln_session="))
    flags = [f.strip().lower() for f in cookie.split(";")[1:]]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert ("secure" in flags) is https


def test_global_admin_opens_default_or_the_picked_project(site: Site) -> None:
    r = signed_in_get(site, site.admin, "/datasets")
    assert '<span title="project">default</span>' in r.text
    assert site.ids["beta_dataset"] not in r.text
    r = signed_in_get(site, site.admin, "/datasets", project="beta")
    assert '<span title="project">beta</span>' in r.text
    assert site.ids["beta_dataset"] in r.text and site.ids["alpha_dataset"] not in r.text


def test_signed_out_pages_redirect_to_sign_in_and_json_is_401(site: Site) -> None:
    client = site.client()
    r = client.get("/jobs?state=running")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fjobs%3Fstate%3Drunning"
    assert client.get(f"/jobs/{site.ids['running_job']}/live.json").status_code == 401
    assert client.get("/deployments/alpha-dep/live.json").status_code == 401
    assert client.get("/").headers["location"] == "/login"


def test_sign_in_goes_back_to_local_pages_only(site: Site) -> None:
    for target, expected in (
        ("/models", "/models"),
        ("//evil.example/x", "/"),
        ("https://e.x", "/"),
    ):
        client = site.client()
        form = client.get("/login")
        r = client.post(
            "/login",
            data={"csrf": csrf_of(form.text), "key": site.keys["alpha_read"], "next": target},
        )
        assert r.headers["location"] == expected


# ---- CSRF --------------------------------------------------------------------------


def _post_routes() -> set[str]:
    """Every POST route of the dashboard's routers."""
    from kiln import web
    from kiln.web import auth, deployments, views

    routers = (web.router, auth.router, views.router, views.api)
    routers += (deployments.router, deployments.api)
    return {
        route.path
        for router in routers
        for route in router.routes
        if "POST" in getattr(route, "methods", ())
    }


@pytest.mark.parametrize("token", [None, "wrong"])
def test_every_post_form_needs_the_session_csrf_token(site: Site, token: str | None) -> None:
    targets = {
        "/logout": "/logout",
        "/jobs/{job_id}/cancel": f"/jobs/{site.ids['running_job']}/cancel",
        "/deployments/{name}/version": "/deployments/alpha-dep/version",
        "/deployments/{name}/routes": "/deployments/alpha-dep/routes",
    }
    # the sign-in form is checked by its own test (double-submit cookie)
    assert _post_routes() == {*targets, "/login"}, "a new POST form needs a CSRF test"
    client = site.client()
    sign_in(client, site.keys["alpha_admin"])
    data = {"version": "1", "version_0": "1", "weight_0": "100"}
    if token is not None:
        data["csrf"] = token
    for path in targets.values():
        r = client.post(path, data=data)
        assert r.status_code == 403, (path, r.status_code)
        assert "security token" in r.text
    assert client.get("/jobs").status_code == 200  # still signed in: nothing happened
    job = site.api("GET", f"/jobs/{site.ids['running_job']}", site.keys["alpha_admin"]).json()
    assert not job["cancel_requested"]


def test_the_sign_in_form_uses_a_double_submit_cookie(site: Site) -> None:
    key = site.keys["alpha_read"]
    client = site.client()
    token = csrf_of(client.get("/login").text)
    assert client.post("/login", data={"key": key}).status_code == 403  # no field
    assert client.post("/login", data={"key": key, "csrf": token + "x"}).status_code == 403
    fresh = site.client()  # the field without its cookie
    assert fresh.post("/login", data={"key": key, "csrf": token}).status_code == 403
    assert client.post("/login", data={"key": key, "csrf": token}).status_code == 303


def test_every_rendered_form_carries_the_token(site: Site) -> None:
    client = site.client()
    token = sign_in(client, site.keys["alpha_admin"])
    pages = [
        "/jobs",
        f"/jobs/{site.ids['running_job']}",
        "/deployments/alpha-dep",
        "/models/iris",
        "/usage",
        "/audit",
    ]
    seen = 0
    for path in pages:
        for form in post_forms(client.get(path).text):
            assert f'name="csrf" value="{token}"' in form, path
            seen += 1
    assert seen >= 6  # sign out on every page, cancel, swap, canary weights


# ---- tenancy -----------------------------------------------------------------------


def test_another_projects_resources_are_not_found(site: Site) -> None:
    client = site.client()
    sign_in(client, site.keys["alpha_admin"])
    for path in (
        f"/jobs/{site.ids['beta_job']}",
        "/models/beta_secret_model",
        "/models/beta_secret_model/versions/1",
        f"/datasets/{site.ids['beta_dataset']}",
        "/deployments/beta-secret-dep",
    ):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"].startswith("text/html")
        assert "beta_secret_table" not in r.text and "Not found" in r.text
    for path in (
        f"/jobs/{site.ids['beta_job']}/live.json",
        "/deployments/beta-secret-dep/live.json",
    ):
        assert client.get(path).status_code == 404, path
    token = csrf_of(client.get("/jobs").text)
    r = client.post(f"/jobs/{site.ids['beta_job']}/cancel", data={"csrf": token})
    assert r.status_code == 404
    r = client.post(
        "/deployments/beta-secret-dep/routes",
        data={"csrf": token, "version_0": "1", "weight_0": "1"},
    )
    assert r.status_code == 404
    beta = site.api("GET", f"/jobs/{site.ids['beta_job']}", site.keys["beta_admin"]).json()
    assert beta["state"] == "queued" and not beta["cancel_requested"]
    listing = (
        client.get("/jobs").text + client.get("/models").text + client.get("/deployments").text
    )
    assert site.ids["beta_job"] not in listing and "beta_secret" not in listing


# ---- escaping ----------------------------------------------------------------------


def test_user_supplied_text_is_escaped(site: Site) -> None:
    """Markup in a dataset's column name and values, a job's error and its log lines."""
    client = site.client()
    sign_in(client, site.keys["alpha_read"])
    escaped = "&lt;script&gt;alert(&#34;kiln&#34;)&lt;/script&gt;"
    for path in (f"/datasets/{site.ids['alpha_dataset']}", f"/jobs/{site.ids['failed_job']}"):
        html = client.get(path).text
        assert "<script>alert" not in html, path
        assert escaped in html, path
    scripts = re.findall(r"<script\b[^>]*>", client.get(f"/jobs/{site.ids['failed_job']}").text)
    assert all("src=" in s or 'type="application/json"' in s for s in scripts)


def test_pages_send_a_strict_content_security_policy(site: Site) -> None:
    r = signed_in_get(site, site.keys["alpha_read"], "/jobs")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"


# ---- sessions end ------------------------------------------------------------------


def test_logout_ends_the_session(site: Site) -> None:
    client = site.client()
    token = sign_in(client, site.keys["alpha_read"])
    old = client.cookies["kiln_session"]
    r = client.post("/logout", data={"csrf": token})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert 'kiln_session=""' in r.headers["set-cookie"]
    replay = site.client()
    replay.cookies.set("kiln_session", old)
    assert replay.get("/jobs").status_code == 303


def test_a_revoked_key_ends_its_sessions(site: Site) -> None:
    made = site.api("POST", "/keys", json={"project": "alpha", "scopes": ["read"]}).json()
    client = site.client()
    sign_in(client, made["key"])
    assert client.get("/models").status_code == 200
    assert site.api("DELETE", f"/keys/{made['id']}").status_code == 200
    assert client.get(f"/jobs/{site.ids['running_job']}/live.json").status_code == 401
    r = client.get("/models")
    assert r.status_code == 303 and r.headers["location"].startswith("/login")


# ---- assets and links --------------------------------------------------------------


def test_plotly_and_the_dashboard_assets_are_served_locally(site: Site) -> None:
    client = site.client()  # no sign-in needed for assets
    r = client.get("/static/plotly.min.js", headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert r.content.startswith(b"/**") and b"plotly.js" in r.content[:200]
    zipped = client.get("/static/plotly.min.js?v=1", headers={"Accept-Encoding": "gzip"})
    assert (
        zipped.headers["content-encoding"] == "gzip"
        and "immutable" in zipped.headers["cache-control"]
    )
    assert zipped.content == r.content  # httpx decodes it
    assert client.get("/static/kiln.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/kiln.js").headers["content-type"].startswith("text/javascript")
    for bad in ("/static/nope.js", "/static/..%2Fpages.py", "/static/%2e%2e%2fsession.py"):
        assert client.get(bad).status_code == 404, bad


def test_no_page_links_outside_the_server(site: Site) -> None:
    client = site.client()
    html = client.get("/login").text
    sign_in(client, site.keys["alpha_admin"])
    for path in (
        "/jobs",
        f"/jobs/{site.ids['running_job']}",
        f"/jobs/{site.ids['failed_job']}",
        "/models",
        "/models/iris",
        "/models/iris/versions/1",
        "/models/iris/versions/3",
        "/datasets",
        f"/datasets/{site.ids['alpha_dataset']}",
        "/deployments",
        "/deployments/alpha-dep",
        "/usage",
        "/audit",
        "/jobs/job_missing",
    ):
        r = client.get(path)
        assert r.status_code in (200, 404), path
        html += r.text
    assert external_urls(html, "http://testserver") == []


# ---- pages -------------------------------------------------------------------------


def test_job_page_embeds_curves_and_polls_new_log_lines(site: Site) -> None:
    client = site.client()
    sign_in(client, site.keys["alpha_read"])
    html = client.get(f"/jobs/{site.ids['running_job']}").text
    loss = figure(html, "loss-chart")
    assert [t["name"] for t in loss["data"]] == ["train_loss", "val_loss"]
    assert loss["data"][0]["x"] == [1, 2, 3]
    assert figure(html, "validation-chart")["data"][0]["name"] == "val_accuracy"
    assert "Cancel job" not in html  # a read key sees no cancel form
    live = client.get(f"/jobs/{site.ids['failed_job']}/live.json").json()
    assert live["state"] == "failed" and live["finished"] and MARKUP in live["error"]
    last = live["logs"][-1]["id"]
    again = client.get(f"/jobs/{site.ids['failed_job']}/live.json?after={last}").json()
    assert again["logs"] == []


def test_model_page_shows_lineage_and_the_pareto_chart(site: Site) -> None:
    client = site.client()
    sign_in(client, site.keys["alpha_read"])
    html = client.get("/models/iris").text
    dataset, job = site.ids["alpha_dataset"], site.ids["running_job"]
    tree = html[html.index('<ul class="tree">') :]
    for link in (f"/datasets/{dataset}", f"/jobs/{job}", "/models/iris/versions/1"):
        assert f'href="{link}"' in tree
    # v3 was compressed from v2, which was compressed from v1: nested lists
    assert re.search(
        r"versions/1\">v1</a>.*?<ul.*?versions/2\">v2</a>.*?<ul.*?versions/3", tree, re.S
    )
    pareto = figure(html, "pareto-chart")
    sizes = pareto["data"][0]
    # in KiB, as the versions table writes sizes
    assert sizes["x"] == [12_000 / 1024, 20_000 / 1024] and sizes["y"] == [0.89, 0.86]
    assert pareto["layout"]["xaxis"]["title"]["text"] == "model size (KiB)"
    # v3 is bigger and worse: off the front, which runs level from v2 to v3's size
    assert pareto["data"][1]["x"] == [12_000 / 1024, 20_000 / 1024]
    assert pareto["data"][1]["y"] == [0.89, 0.89]
    assert pareto["layout"]["shapes"][0]["y0"] == 0.9  # the source version's metric
    version = client.get("/models/iris/versions/3").text
    lineage = version[version.index('id="lineage"') :]
    order = [f"/datasets/{dataset}", f"/jobs/{job}", "versions/1", "versions/2", "v3"]
    positions = [lineage.index(p) for p in order]
    assert positions == sorted(positions)


def test_dataset_page_profiles_columns_once(site: Site) -> None:
    client = site.client()
    sign_in(client, site.keys["alpha_read"])
    html = client.get(f"/datasets/{site.ids['alpha_dataset']}").text
    row = re.search(r"<td>x</td>(.*?)</tr>", html, re.S).group(1)  # type: ignore[union-attr]
    cells = re.findall(r"<td>([^<]*)</td>", row)
    assert cells[:7] == ["numeric", "float64", "1", "5", "1", "6", "3.6"]
    color = re.search(r"<td>color</td>(.*?)</tr>", html, re.S).group(1)  # type: ignore[union-attr]
    assert "red (3)" in color
    cache = site.app.state.web.profiles
    assert site.ids["alpha_dataset"] in cache._entries
    calls = []
    original = site.services.store.get_file
    site.services.store.get_file = lambda *a: calls.append(a) or original(*a)
    try:
        assert client.get(f"/datasets/{site.ids['alpha_dataset']}").status_code == 200
    finally:
        site.services.store.get_file = original
    assert calls == []  # served from the cache


def test_deployment_forms_need_deploy_scope_and_valid_weights(site: Site) -> None:
    reader = site.client()
    token = sign_in(reader, site.keys["alpha_read"])
    html = reader.get("/deployments/alpha-dep").text
    assert 'id="routes-form"' not in html and 'id="live-panel"' in html
    r = reader.post(
        "/deployments/alpha-dep/routes", data={"csrf": token, "version_0": "1", "weight_0": "5"}
    )
    assert r.status_code == 403
    deployer = site.client()
    token = sign_in(deployer, site.keys["alpha_deploy"])
    r = deployer.post(
        "/deployments/alpha-dep/routes", data={"csrf": token, "version_0": "1", "weight_0": "0"}
    )
    assert r.status_code == 422 and "at least one version" in r.text
    r = deployer.post(
        "/deployments/alpha-dep/routes", data={"csrf": token, "version_0": "1", "weight_0": "x"}
    )
    assert r.status_code == 422 and "routes.0.weight" in r.text


def test_audit_log_is_for_admin_keys(site: Site) -> None:
    r = signed_in_get(site, site.keys["alpha_read"], "/audit")
    assert r.status_code == 403 and "Audit log</a>" not in r.text
    r = signed_in_get(site, site.keys["alpha_admin"], "/audit")
    assert r.status_code == 200 and "web.login" in r.text
    assert "Audit log</a>" in r.text


def test_usage_page_renders_the_projects_summary(site: Site) -> None:
    r = signed_in_get(site, site.keys["alpha_read"], "/usage")
    assert r.status_code == 200
    # uploading the dataset and registering versions stored bytes in alpha
    assert 'data-kind="stored_bytes"' in r.text


# ---- jobs' outcomes and usage in people's units (issue #15) -------------------------

MATRIX = [[9, 1, 0], [0, 10, 0], [2, 0, 8]]


def finished_jobs(site: Site) -> dict[str, str]:
    """Alpha's finished jobs, made once: a train job that stopped early at 22 of 30
    epochs (metrics, a confusion matrix, measured resources) and a compress job that
    registered four variants of ``iris``; and ten hours of compute and a million
    predictions in alpha's usage, under a compute quota."""
    if "early_job" in site.ids:
        return site.ids
    from kiln.jobs import queue
    from kiln.lifecycle import JobState
    from kiln.monitor.usage import record, set_quota
    from kiln.store.tables import Project

    metrics = {"accuracy": 0.9, "f1_macro": 0.89, "confusion_matrix": MATRIX, "rows": 30}
    with site.services.db.session() as s:
        alpha = s.get(Project, site.ids["alpha"])
        assert alpha is not None
        early = queue.new_job(s, alpha, "train", {"name": "wine"}, max_attempts=1)
        early.state, early.attempts = JobState.succeeded, 1
        early.progress = {"epoch": 22, "epochs": 30}
        early.result = {"model": "wine", "version": 1, "metrics": {"test": metrics, "val": metrics}}
        early.resources = {
            "wall_seconds": 101.888,
            "cpu_seconds": 7300.0,
            "peak_rss_bytes": 323_607_000,
            "device": "cpu",
            "attempts": [],
        }
        squeeze = queue.new_job(s, alpha, "compress", {"source": "model:iris@1"}, max_attempts=1)
        squeeze.state = JobState.succeeded
        variants = [{"variant": f"0{i}-step", "version": 10 + i} for i in range(1, 5)]
        squeeze.result = {"model": "iris", "source_version": 1, "variants": variants}
        record(s, alpha.id, "compute_seconds", 36_000.0, device="cpu")
        record(s, alpha.id, "prediction_requests", 1e6)
        set_quota(s, alpha.id, "compute_seconds", "month", 72_000.0)
        site.ids |= {"early_job": early.id, "compress_job": squeeze.id}
    return site.ids


def test_a_finished_jobs_result_is_tables_and_a_heat_map(site: Site) -> None:
    ids = finished_jobs(site)
    client = site.client()
    sign_in(client, site.keys["alpha_read"])
    html = client.get(f"/jobs/{ids['early_job']}").text
    assert '<tr data-metric="accuracy"><th>accuracy</th><td class="num">0.9</td>' in html
    assert '"confusion_matrix"' not in html  # no raw JSON of the result
    heat = re.findall(r'<table class="heatmap">(.*?)</table>', html, flags=re.S)
    assert len(heat) == 2  # test and val
    cells = re.findall(
        r'<td class="(\w+)[^"]*" style="--share: ([0-9.]+)"[^>]*>(\d+)</td>', heat[0]
    )
    assert [int(c) for _, _, c in cells] == [n for row in MATRIX for n in row]
    assert cells[0] == ("hit", "0.900", "9") and cells[1] == ("miss", "0.100", "1")


def test_an_early_stopped_job_shows_a_full_bar_and_its_resources(site: Site) -> None:
    ids = finished_jobs(site)
    client = site.client()
    sign_in(client, site.keys["alpha_read"])
    html = client.get(f"/jobs/{ids['early_job']}").text
    assert '<progress id="job-progress" max="30" value="30">' in html
    assert "stopped early at 22/30 epochs" in html
    live = client.get(f"/jobs/{ids['early_job']}/live.json").json()
    assert live["bar"] == {"value": 30, "max": 30, "text": "stopped early at 22/30 epochs"}
    resources = re.search(r'<section id="job-resources".*?</section>', html, flags=re.S)
    assert resources is not None
    for fact in ("101.9 s", "2.0 h", "308.6 MiB", "cpu"):
        assert f"<dd>{fact}</dd>" in resources.group(0), fact
    assert "ran on" not in resources.group(0) and "ray-workers" not in resources.group(0)


def ray_record(job: str, workers: list[tuple[str, str, int, float, float]]) -> dict[str, Any]:
    """A kiln.jobs.placement.ExecutorRecord: Ray job ``job``; workers (node id, node ip,
    pid, CPUs, GPUs) in rank order, 60 s each."""
    return {
        "kind": "ray",
        "address": "ray://ray-head:10001",
        "ray_job_id": job,
        "worker_seconds": 60.0 * len(workers),
        "workers": [
            {"rank": r, "node_id": n, "node_ip": ip, "pid": pid, "cpus": c, "gpus": g}
            for r, (n, ip, pid, c, g) in enumerate(workers)
        ],
    }


def test_a_job_that_trained_on_ray_names_its_cluster_and_workers(site: Site) -> None:
    from kiln.jobs import queue
    from kiln.lifecycle import JobState
    from kiln.store.tables import Project

    first = ray_record("02000000", [("a1", "10.0.0.5", 4100, 2.0, 0.0)] * 2)
    latest = ray_record(
        "03000000",
        [("a1", "10.0.0.5", 4242, 2.0, 0.0), ("b2", "10.0.0.6", 5150, 2.0, 0.5),
         ("b2", "10.0.0.6", 5151, 2.0, 0.5)],
    )  # fmt: skip
    figures = {"wall_seconds": 30.0, "cpu_seconds": 3.0, "peak_rss_bytes": 1 << 20}
    with site.services.db.session() as s:
        alpha = s.get(Project, site.ids["alpha"])
        assert alpha is not None
        job = queue.new_job(s, alpha, "train", {"name": "wine"}, max_attempts=2)
        job.state, job.attempts = JobState.succeeded, 2
        job.resources = {
            "wall_seconds": 60.0, "cpu_seconds": 6.0, "peak_rss_bytes": 1 << 20,
            "device": "cpu", "executor": latest,
            "attempts": [
                {"attempt": 1, "state": "lost", **figures, "device": "cpu", "executor": first},
                {"attempt": 2, "state": "succeeded", **figures, "device": "cpu",
                 "executor": latest},
            ],
        }  # fmt: skip
        job_id = job.id

    # the API sends the records as the worker wrote them
    sent = site.api("GET", f"/jobs/{job_id}", site.keys["alpha_admin"]).json()["resources"]
    assert sent["executor"] == latest and sent["attempts"][0]["executor"] == first

    client = site.client()
    sign_in(client, site.keys["alpha_read"])
    html = client.get(f"/jobs/{job_id}").text
    found = re.search(r'<section id="job-resources".*?</section>', html, flags=re.S)
    assert found is not None
    section = found.group(0)
    assert (
        "<dt>ran on</dt><dd>Ray ray://ray-head:10001, Ray job 03000000, 3 workers on 2 nodes</dd>"
        in section
    )
    assert "<dt>worker time</dt><dd>3.0 min</dd>" in section  # 3 workers x 60 s
    assert (
        "<dt>attempt 1 ran on</dt><dd>Ray ray://ray-head:10001, Ray job 02000000, "
        "2 workers on 1 node</dd>" in section
    )
    rows = re.findall(r'<tr data-rank="(\d+)">(.*?)</tr>', section, flags=re.S)
    cells = {rank: re.findall(r"<td[^>]*>([^<]*)</td>", row) for rank, row in rows}
    assert cells == {
        "0": ["0", "10.0.0.5", "4242", "2", "0"],
        "1": ["1", "10.0.0.6", "5150", "2", "0.5"],
        "2": ["2", "10.0.0.6", "5151", "2", "0.5"],
    }
    assert 'title="node b2"' in section


def test_the_jobs_list_names_jobs_and_a_compress_jobs_variants(site: Site) -> None:
    ids = finished_jobs(site)
    client = site.client()
    sign_in(client, site.keys["alpha_read"])
    html = client.get("/jobs").text
    row = re.search(rf'<tr data-job="{ids["compress_job"]}">(.*?)</tr>', html, flags=re.S)
    assert row is not None
    assert '<td class="name">iris</td>' in row.group(1)  # named by its result's model
    assert 'href="/models/iris/versions/11"' in row.group(1)
    assert 'href="/models/iris/versions/14"' in row.group(1)
    assert "(4 variants)" in row.group(1)
    early = re.search(rf'<tr data-job="{ids["early_job"]}">(.*?)</tr>', html, flags=re.S)
    assert early is not None and '<td class="name">wine</td>' in early.group(1)
    assert '<progress max="30" value="30">' in early.group(1)
    assert "stopped early at 22/30 epochs" in early.group(1)


def test_usage_is_shown_in_the_units_the_cli_prints(site: Site) -> None:
    from kiln.monitor.units import amount

    finished_jobs(site)
    html = signed_in_get(site, site.keys["alpha_read"], "/usage").text
    totals = dict(
        re.findall(r'<tr data-kind="(\w+)" data-value="[^"]*"><th>\w+</th><td>([^<]*)<', html)
    )
    assert totals["prediction_requests"] == "1,000,000" == amount("prediction_requests", 1e6)
    assert totals["compute_seconds"].endswith(" h")  # ten hours and a little more
    assert totals["stored_bytes"].endswith(("KiB", "MiB"))
    quota = re.search(r'<tr data-kind="compute_seconds">.*?</tr>', html, flags=re.S)
    assert quota is not None and '<td class="limit">20.0 h</td>' in quota.group(0)
