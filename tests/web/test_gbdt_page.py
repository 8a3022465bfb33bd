"""A gbdt version's page draws its feature importances (summary.importance, written by
the train job) as a horizontal bar chart of the top features by total gain."""

from __future__ import annotations

import json
import re
from typing import Any

from web_support import Site, sign_in

from kiln.web import charts


def _figure(html: str, chart: str) -> dict[str, Any]:
    found = re.search(
        rf'<script type="application/json" id="{chart}-data">(.*?)</script>', html, re.S
    )
    assert found, f"no {chart} on the page"
    figure: dict[str, Any] = json.loads(found.group(1))
    return figure


def _register_trees(site: Site, gains: list[list[Any]]) -> None:
    from sqlalchemy import select

    from kiln.store.registry import register_version
    from kiln.store.tables import Project

    with site.services.db.session() as s:
        alpha = s.scalars(select(Project).where(Project.name == "alpha")).one()
        register_version(
            s,
            alpha,
            "trees",
            task="classification",
            artifact_key="none",
            metrics={"test": {"accuracy": 0.91}},
            summary={"model": "gbdt", "parameters": 0, "epochs_run": 40, "importance": gains},
            size_bytes=9_000,
        )


def test_the_importance_figure_is_top_features_as_horizontal_bars() -> None:
    gains = [(f"f{i}", float(i)) for i in range(25)] + [("nan", float("nan"))]
    figure = charts.importance(gains)
    (trace,) = figure["data"]
    assert trace["type"] == "bar" and trace["orientation"] == "h"
    assert list(trace["y"]) == [f"f{i}" for i in range(24, 4, -1)]  # top 20, largest first
    assert list(trace["x"]) == [float(i) for i in range(24, 4, -1)]
    layout = figure["layout"]
    assert layout["xaxis"]["title"]["text"] == "total gain"
    assert layout["yaxis"]["autorange"] == "reversed"  # the largest at the top
    json.dumps(figure, allow_nan=False)  # what the page embeds is valid JSON


def test_a_gbdt_version_page_shows_the_importance_chart(site: Site) -> None:
    gains = [[f"col_{i}", 100.0 - i] for i in range(30)]
    _register_trees(site, gains)
    client = site.client()
    sign_in(client, site.keys["alpha_read"])
    r = client.get("/models/trees/versions/1")
    assert r.status_code == 200, r.text
    assert "Feature importance" in r.text
    figure = _figure(r.text, "importance-chart")
    (trace,) = figure["data"]
    assert trace["orientation"] == "h"
    assert trace["y"] == [f"col_{i}" for i in range(20)]
    assert figure["layout"]["xaxis"]["title"]["text"] == "total gain"
    assert "plotly" in r.text  # the page loads plotly.js for it
    # the pairs are drawn, not dumped into the summary table
    summary = r.text.split("<h2>Summary</h2>", 1)[1]
    assert "importance" not in summary.split("</table>", 1)[0]


def test_other_versions_have_no_importance_chart(site: Site) -> None:
    client = site.client()
    sign_in(client, site.keys["alpha_read"])
    r = client.get("/models/iris/versions/1")
    assert r.status_code == 200
    assert "importance-chart" not in r.text
