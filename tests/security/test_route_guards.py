"""Every route's key guard, probed over the app's own route table.

No key, a malformed or unknown key, and a revoked key (project or global) are 401 on
every route but health; a key of the right project that lacks the route's scope is 403.
The table comes from the app (see security_routes), so a new route is covered the day
it is added, and a route that forgets its guard fails here.
"""

from __future__ import annotations

from typing import Any

import pytest
from security_routes import (
    ANY_KEY,
    OPEN,
    RouteSpec,
    call,
    error_code,
    guarded,
    route_table,
    scoped,
)

from kiln.store.keys import SCOPES

FAKE_KEYS = [
    None,  # no Authorization header
    "",
    "not-a-kiln-key",
    "kiln_0123456789abcdef_" + "A" * 43,  # well formed, never issued
    "kiln_../../etc/passwd_x",
]


def _values(served: Any) -> dict[str, str]:
    """Real alpha ids for the path parameters: only the guard may refuse the call."""
    return {
        "dataset_id": served.refs["alpha"].removeprefix("dataset:"),
        "job_id": served.jobs["train1"],
        "name": "iris",
        "version": "1",
        "alias": "staging",
        "key_id": "0123456789abcdef",
    }


def test_the_route_table_is_the_whole_api(served: Any) -> None:
    names = {r.name for r in route_table()}
    must = {"datasets.upload", "jobs.submit", "models.bundle", "deployments.predict", "v2.infer"}
    assert must | {"keys.revoke", "quotas.set", "audit.list", "metrics"} <= names
    assert {r.scope for r in route_table()} - {OPEN, ANY_KEY} <= set(SCOPES)
    # every route but health and the API's documentation pages needs a key; any other
    # open route may only refuse (a placeholder answering 405, say)
    health = {"healthz", "readyz", "v2.live", "v2.ready"}
    docs = {"custom_swagger_ui_html", "swagger_ui_redirect", "redoc_html"}
    open_routes = [r for r in route_table() if r.scope is OPEN]
    assert health <= {r.name for r in open_routes}
    for route in open_routes:
        if route.name not in health | docs:
            r = call(served.client, route, None, **_values(served))
            assert r.status_code == 405, (str(route), r.status_code, r.text)


@pytest.mark.parametrize("route", guarded(), ids=str)
def test_no_key_or_a_bad_key_is_401(served: Any, route: RouteSpec) -> None:
    for key in FAKE_KEYS:
        r = call(served.client, route, key, **_values(served))
        assert r.status_code == 401, (key, r.status_code, r.text)
        assert error_code(route, r) in ("unauthorized", None), r.text


@pytest.fixture(scope="module")
def lacking(served: Any) -> dict[str, str]:
    """Per scope, a key of project alpha with every other scope (admin implies all)."""
    keys = {}
    for scope in SCOPES:
        others = [s for s in SCOPES if s not in (scope, "admin")]
        keys[scope] = served.create_key("alpha", others, name=f"lacks-{scope}")
    return keys


@pytest.mark.parametrize("route", scoped(), ids=str)
def test_a_key_without_the_routes_scope_is_403(
    served: Any, lacking: dict[str, str], route: RouteSpec
) -> None:
    assert route.scope is not None
    r = call(served.client, route, lacking[route.scope], **_values(served))
    assert r.status_code == 403, (route.scope, r.status_code, r.text)
    assert error_code(route, r) in ("forbidden", None), r.text
    assert route.scope in r.text


@pytest.fixture(scope="module")
def revoked(served: Any) -> list[str]:
    """A project admin key and a global admin key, each shown to work, then revoked."""
    keys = []
    for project in ("alpha", None):
        r = served.post(
            "/keys", served.admin, {"project": project, "scopes": ["admin"], "name": "revoked"}
        )
        assert r.status_code == 201, r.text
        key, key_id = r.json()["key"], r.json()["id"]
        assert served.get("/jobs", key, project="alpha").status_code == 200
        r = served.delete(f"/keys/{key_id}", served.admin)
        assert r.status_code == 200, r.text
        assert r.json()["revoked_at"] is not None
        keys.append(key)
    return keys


@pytest.mark.parametrize("route", guarded(), ids=str)
def test_a_revoked_key_is_401_everywhere(served: Any, revoked: list[str], route: RouteSpec) -> None:
    for key in revoked:
        r = call(served.client, route, key, **_values(served))
        assert r.status_code == 401, (r.status_code, r.text)
        assert error_code(route, r) in ("unauthorized", None), r.text
