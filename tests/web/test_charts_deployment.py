"""The deployment page's drift section (kiln.web.deployments.drift_rows) and what the
page shows of it where there is nothing to compare yet (the browser test in
test_web_browser_charts.py checks a deployment that really drifted)."""

from __future__ import annotations

from web_support import Site, sign_in

from kiln.monitor.live import no_drift
from kiln.web.deployments import drift_rows


def test_drift_rows_put_flagged_columns_first_then_by_psi() -> None:
    report = {
        "deployment": "d",
        "model": "m",
        "rows": 400,
        "threshold": 0.2,
        "version": 3,
        "reference": True,
        "columns": {
            "age": {"psi": 0.05, "drifted": False},
            "area": {"psi": 1.7, "drifted": True},
            "city": {"psi": None, "drifted": False},
            "rooms": {"psi": 0.4, "drifted": True},
            "floor": {"psi": 0.15, "drifted": False},
        },
        "drifted": ["rooms", "area"],
    }
    table = drift_rows(report)
    assert [c["column"] for c in table["columns"]] == ["area", "rooms", "floor", "age", "city"]
    assert table["drifted"] == ["area", "rooms"]
    assert (table["threshold"], table["version"], table["rows"]) == (0.2, 3, 400)
    assert table["message"] is None


def test_without_a_reference_the_table_is_empty_and_says_why() -> None:
    table = drift_rows(no_drift(0.25, None, "deployment x is loading"))
    assert table["columns"] == [] and not table["reference"]
    assert table["message"] == "deployment x is loading"


def test_the_deployment_page_has_a_drift_section_with_its_threshold(site: Site) -> None:
    client = site.client()
    sign_in(client, site.keys["alpha_read"])
    html = client.get("/deployments/alpha-dep").text
    section = html[html.index('<section class="panel" id="drift">') :]
    section = section[: section.index("</section>")]
    threshold = site.services.settings.drift_threshold
    assert f'<span id="drift-threshold">{threshold:.3g}</span>' in section
    assert 'id="drift-message">deployment alpha-dep is ready' in section  # no routes: no feed
    assert 'id="drift-table"' not in section
