"""The API's route table, read from the app itself, for probes over every route.

Each route of ``kiln.api.app.ROUTERS`` (under ``/api/v1``), of the KServe v2 router and
the app's own (``/healthz``, ``/readyz``, ``/metrics``) becomes a :class:`RouteSpec`
with the scope its dependencies demand: a ``Scope("…")`` dependency names it, the
inference dependency demands ``predict``, a bare ``principal`` any valid key, and no
key dependency at all makes the route open. A route added later is probed without
anyone listing it here.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

OPEN = None  # the route needs no key
ANY_KEY = ""  # any valid key, whatever its scopes


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str  # the full template, e.g. /api/v1/jobs/{job_id}
    name: str
    scope: str | None  # OPEN, ANY_KEY, or the one scope it needs

    @property
    def params(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.path)

    def url(self, **values: str) -> str:
        """The path with each ``{param}`` replaced (missing ones by ``x``)."""
        return re.sub(r"{(\w+)}", lambda m: values.get(m[1], "x"), self.path)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _scope_of(route: Any) -> str | None:
    from kiln.api.deps import Scope

    found: list[str] = []
    calls: set[str] = set()

    def walk(dependant: Any) -> None:
        for sub in dependant.dependencies:
            if isinstance(sub.call, Scope):
                found.append(sub.call.scope)
            calls.add(getattr(sub.call, "__name__", ""))
            walk(sub)

    walk(route.dependant)
    if found:
        assert len(set(found)) == 1, f"{route.path}: several scopes {found}"
        return found[0]
    if "inference_project" in calls:
        return "predict"
    if "principal" in calls:
        return ANY_KEY
    return OPEN


@functools.cache
def route_table() -> tuple[RouteSpec, ...]:
    import tempfile

    from fastapi.routing import APIRoute

    from kiln.api.app import API, ROUTERS
    from kiln.api.routes import v2
    from kiln.app import create_app
    from kiln.settings import Settings

    routers = [(API, module.router) for module in ROUTERS] + [("", v2.router)]
    # the app's own routes (health, metrics), defined inside create_app
    app = create_app(Settings(home=tempfile.mkdtemp(prefix="kiln-routes-")))
    own = [r for r in app.router.routes if isinstance(r, APIRoute)]
    specs = []
    for prefix, routes in [*((p, r.routes) for p, r in routers), ("", own)]:
        for route in routes:
            if not isinstance(route, APIRoute):
                continue
            for method in sorted(route.methods):
                specs.append(RouteSpec(method, prefix + route.path, route.name, _scope_of(route)))
    return tuple(specs)


def guarded() -> list[RouteSpec]:
    """Every route that needs a key."""
    return [r for r in route_table() if r.scope is not OPEN]


def scoped() -> list[RouteSpec]:
    """Every route that needs one particular scope."""
    return [r for r in route_table() if r.scope]


def is_v2(route: RouteSpec | str) -> bool:
    """A KServe v2 route: its errors have that protocol's shape, ``{"error": "..."}``."""
    return str(route.path if isinstance(route, RouteSpec) else route).startswith("/v2/")


def call(client: Any, route: RouteSpec, key: str | None, **values: str) -> Any:
    """One request to ``route`` with no body (the guard answers before the body is
    read), as ``key`` (None: no Authorization header). The client's kiln error-shape
    check is skipped for the v2 routes, which answer in the protocol's shape."""
    from fastapi.testclient import TestClient

    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    send = TestClient.request if is_v2(route) else type(client).request
    return send(client, route.method, route.url(**values), headers=headers)


def error_code(route: RouteSpec | str, response: Any) -> str | None:
    """The kiln error code of a 4xx answer; None for a v2 route (after checking its
    protocol's shape)."""
    body = response.json()
    if is_v2(route):
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        return None
    code: str = body["error"]["code"]
    return code
