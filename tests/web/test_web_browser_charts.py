"""The dashboard's charts, drift table and hot-swap form in a real browser (issue #15):
Playwright driving Debian's Chromium against a live kiln server that trains a small
regression model whose target is in the hundreds of thousands (so its MSE is ~1e10,
next to an R² of about 0..1), serves it, and receives shifted inputs (drift).

Each test reads what plotly.js drew (the SVG and the ``_fullLayout`` it computed), and
saves a screenshot of the page it checked in ``test-artifacts/web/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
from web_support import admin_rest, screenshot, sign_in_page

from cli.live_server import Platform, running_platform
from support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("chromium")]  # a live server

SHIFT = 8.0  # standard deviations the drifted column moves by


class Server:
    """The running platform, a REST client on it, and the training job's id."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.url = platform.url
        self.rest = admin_rest(platform.url, platform.admin_key)
        self.job = ""


def _houses(rows: int, seed: int = 0) -> pd.DataFrame:
    """A price in the hundreds of thousands from two numeric columns."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"area": rng.normal(100, 20, rows), "age": rng.normal(30, 10, rows)})
    frame["price"] = 2_000 * frame["area"] - 1_000 * frame["age"] + rng.normal(0, 5e3, rows)
    return frame


def _variant(server: Server, name: str, size: int, p50: float, test: float) -> None:
    """A compressed variant of v1 as ``kiln compress`` registers one (its report's parts
    that the model page reads), sharing v1's artifact."""
    from kiln.store.registry import get_model, register_version, resolve_version
    from kiln.store.tables import Project

    report = {
        "name": name,
        "model_bytes": size,
        "latency": {"batch1_p50_ms": p50},
        "metric": {"name": "r2", "test": test, "source_test": 0.8},
    }
    with server.platform.services.db.session() as s:
        project = s.get(Project, 1)
        source = resolve_version(s, get_model(s, project, "houses"), 1)
        register_version(
            s,
            project,
            "houses",
            artifact_key=source.artifact_key,
            task=source.task,
            metrics={"test": {"r2": test}},
            summary={"variant": name, "report": report},
            size_bytes=size,
            parent_id=source.id,
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """kiln with model ``houses``: v1 trained, three compressed variants (v2-v4, the newest
    not served), v1 deployed and sent 200 rows whose ``area`` moved by SHIFT deviations."""
    with running_platform(tmp_path_factory.mktemp("web-charts")) as platform:
        s = Server(platform)
        data = _houses(240).to_csv(index=False).encode()
        r = s.rest.post("/datasets", files={"file": ("houses.csv", data, "text/csv")})
        assert r.status_code == 201, r.text
        spec = {
            "name": "houses",
            "task": "regression",
            "data": {"source": r.json()["ref"], "target": "price"},
            "model": {"type": "mlp", "hidden": [8]},
            "train": {"epochs": 4, "device": "cpu"},
        }
        job = s.rest.post("/jobs", json={"kind": "train", "spec": spec})
        assert job.status_code == 201, job.text
        s.job = job.json()["id"]
        wait_for(
            lambda: s.rest.get(f"/jobs/{s.job}").json()["state"] == "succeeded",
            what="training",
            timeout=120,
        )
        for name, size, p50, test in (
            ("int8", 3_000, 0.04, 0.78),
            ("pruned", 5_000, 0.09, 0.74),
            ("fp16", 6_000, 0.06, 0.79),
        ):
            _variant(s, name, size, p50, test)
        deploy = {"name": "houses", "model": "houses", "version": 1, "backend": "torch"}
        r = s.rest.post("/deployments", json=deploy)
        assert r.status_code == 201, r.text
        shifted = _houses(200, seed=1).drop(columns="price")
        shifted["area"] += SHIFT * 20
        for start in range(0, 200, 50):
            rows = shifted.iloc[start : start + 50].to_dict(orient="records")
            r = s.rest.post("/deployments/houses/predict", json={"inputs": rows})
            assert r.status_code == 200, r.text
        try:
            yield s
        finally:
            s.rest.close()


def drawn(page: Any, chart: str) -> dict[str, Any] | None:
    """What plotly.js made of a chart: its layout as computed, and each trace's points."""
    found: dict[str, Any] | None = page.evaluate(
        """(id) => {
          const gd = document.getElementById(id);
          if (!gd || !gd._fullLayout || !gd._fullData) return null;
          const L = gd._fullLayout;
          const axis = (a) => a ? {type: a.type, range: a.range, title: a.title.text,
                                   ticks: (a._vals || []).map((t) => t.text)} : null;
          return {
            showlegend: L.showlegend,
            legend: L.showlegend ? gd.querySelector(".legend").getBoundingClientRect().toJSON()
                                 : null,
            xtitle: gd.querySelector(".g-xtitle").getBoundingClientRect().toJSON(),
            axes: {x: axis(L.xaxis), y: axis(L.yaxis), x2: axis(L.xaxis2), y2: axis(L.yaxis2)},
            traces: gd._fullData.map((t) => ({name: t.name, mode: t.mode, x: t.x, y: t.y,
                                              yaxis: t.yaxis, showlegend: t.showlegend})),
          };
        }""",
        chart,
    )
    return found


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return not (
        a["right"] <= b["left"]
        or b["right"] <= a["left"]
        or a["bottom"] <= b["top"]
        or b["bottom"] <= a["top"]
    )


def test_validation_metrics_of_different_scales_get_their_own_axes(
    page: Any, server: Server
) -> None:
    sign_in_page(page, server.url, server.platform.admin_key)
    page.goto(f"{server.url}/jobs/{server.job}")
    chart = wait_for(lambda: drawn(page, "validation-chart"), what="the validation chart")
    errors = {t["name"] for t in chart["traces"] if t["yaxis"] == "y"}
    scores = {t["name"] for t in chart["traces"] if t["yaxis"] == "y2"}
    assert errors == {"val_mse", "val_rmse", "val_mae"} and scores == {"val_r2"}
    assert chart["axes"]["y"]["type"] == "log"
    assert chart["axes"]["y2"]["title"] == "val_r2"  # the only metric on its axis
    low, high = chart["axes"]["y2"]["range"]
    assert high - low < 100  # R² is not squashed flat by the MSE's 1e10
    assert chart["showlegend"] and not _overlap(chart["legend"], chart["xtitle"])
    loss = wait_for(lambda: drawn(page, "loss-chart"), what="the loss chart")
    assert loss["showlegend"] and not _overlap(loss["legend"], loss["xtitle"])
    screenshot(page, "charts-validation-axes")


def test_the_compression_chart_is_padded_readable_and_draws_its_front(
    page: Any, server: Server
) -> None:
    sign_in_page(page, server.url, server.platform.admin_key)
    page.goto(server.url + "/models/houses")
    chart = wait_for(lambda: drawn(page, "pareto-chart"), what="the Pareto chart")
    size, latency = chart["traces"][0], chart["traces"][2]
    assert chart["axes"]["x"]["title"] == "model size (KiB)"
    table = page.locator("#versions tbody tr", has_text="int8").locator("td").nth(4)
    assert table.inner_text() == "2.9 KiB"  # the table's unit is the chart's
    assert sorted(size["x"]) == pytest.approx([3000 / 1024, 5000 / 1024, 6000 / 1024])
    for points, axis in ((size, chart["axes"]["x"]), (latency, chart["axes"]["x2"])):
        low, high = axis["range"]  # log10 of the values
        assert all(low < np.log10(x) < high for x in points["x"])  # off the frame's edges
        ticks = [float(t.replace("\u2212", "-")) for t in axis["ticks"] if t]
        assert ticks == sorted(ticks) and all(t > 0 for t in ticks), axis["ticks"]
    low, high = chart["axes"]["y"]["range"]
    assert all(low < y < high for y in size["y"])
    for front in (chart["traces"][1], chart["traces"][3]):
        assert front["mode"] == "lines" and front["showlegend"] and len(front["x"]) >= 2
        assert front["x"] == sorted(front["x"])
    # plotly drew the fronts: a path with a length in each
    lengths = page.evaluate(
        "() => [...document.querySelectorAll('#pareto-chart .scatterlayer .js-line')]"
        ".map((p) => p.getTotalLength())"
    )
    assert len(lengths) == 2 and all(n > 10 for n in lengths), lengths
    screenshot(page, "charts-compression-tradeoff")


def test_the_deployment_page_shows_drift_and_swaps_from_the_served_version(
    page: Any, server: Server
) -> None:
    sign_in_page(page, server.url, server.platform.admin_key)
    page.goto(server.url + "/deployments/houses")
    drift = server.rest.get("/deployments/houses/drift").json()
    assert drift["drifted"] == ["area"], drift
    flagged = page.locator("#drift-table tr.drifted")
    assert flagged.count() == 1 and flagged.get_attribute("data-column") == "area"
    assert "drifted" in flagged.inner_text()
    colour = flagged.locator("td").first.evaluate("(td) => getComputedStyle(td).backgroundColor")
    assert colour != "rgba(0, 0, 0, 0)"  # highlighted
    psi = float(flagged.locator("td").nth(1).inner_text())
    assert psi == pytest.approx(drift["columns"]["area"]["psi"], rel=1e-2)
    calm = page.locator("#drift-table tr[data-column='age']")
    assert "drifted" not in (calm.get_attribute("class") or "")
    assert page.locator("#drift-threshold").inner_text() == f"{drift['threshold']:.3g}"
    assert "v1" in page.locator("#drift-reference").inner_text()
    # v4 is the newest version; v1 is served, and the hot-swap form starts from it
    options = page.locator("#swap-form select[name=version] option").all_inner_texts()
    assert options[0].startswith("v4")
    assert page.locator("#swap-form select[name=version]").input_value() == "1"
    screenshot(page, "deployment-drift-and-swap")


def test_traffic_axes_never_go_below_zero(page: Any, server: Server) -> None:
    sign_in_page(page, server.url, server.platform.admin_key)
    page.goto(server.url + "/deployments/houses")
    chart = wait_for(lambda: drawn(page, "traffic-chart"), what="the traffic chart")
    for name in ("y", "y2"):
        low, _ = chart["axes"][name]["range"]
        ticks = [float(t.replace("\u2212", "-")) for t in chart["axes"][name]["ticks"] if t]
        assert low >= 0 and all(t >= 0 for t in ticks), (name, chart["axes"][name])
    screenshot(page, "deployment-traffic")
