"""What every dashboard page shares: the signed-in viewer, templates, error pages, headers.

Templates are Jinja2 with autoescaping on for every file, so any name, message or
value a user supplied is shown as text. Pages carry a strict Content-Security-Policy
(scripts only from this server, no inline script; chart data travels in
``<script type="application/json">`` blocks that are never executed).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.errors import AuthError, KilnError, NotFoundError
from kiln.monitor.units import binary_size
from kiln.services import Services
from kiln.store.keys import Principal
from kiln.store.projects import project_for
from kiln.store.tables import Project
from kiln.web.session import COOKIE, SessionStore, WebSession, check_key, clear_session_cookie

HERE = Path(__file__).parent
STATIC = HERE / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self'; connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
# plotly.js sets style attributes on the SVG it draws, hence 'unsafe-inline' for styles
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class WebState:
    """The dashboard's in-memory state, one per app (``app.state.web``)."""

    sessions: SessionStore = field(default_factory=SessionStore)
    profiles: Any = None  # kiln.web.profile.ProfileCache, set by mount()


def web_state(request: Request) -> WebState:
    state: WebState = request.app.state.web
    return state


@dataclass(frozen=True)
class Viewer:
    """The signed-in user of one request: key, project and the server's services."""

    sid: str
    session: WebSession
    principal: Principal
    project: Project
    services: Services

    def can(self, scope: str) -> bool:
        scopes = self.principal.scopes
        return scope in scopes or "admin" in scopes


class SignInRequired(Exception):  # noqa: N818 - a condition, answered with a redirect
    pass


def current_viewer(request: Request) -> Viewer | None:
    """The viewer behind the session cookie, or None; ends a session whose key no longer
    authenticates (revoked) or whose project is gone."""
    state = web_state(request)
    sid = request.cookies.get(COOKIE, "")
    session = state.sessions.get(sid)
    if session is None:
        return None
    svc: Services = request.app.state.services
    try:
        who = check_key(svc, session.token)
        with svc.db.session() as s:
            project = project_for(s, who, session.project)
    except (AuthError, NotFoundError):
        state.sessions.end(sid)
        return None
    viewer = Viewer(sid, session, who, project, svc)
    if not viewer.can("read"):
        state.sessions.end(sid)
        return None
    request.state.viewer = viewer
    return viewer


def viewer(request: Request) -> Viewer:
    """``Depends``: the signed-in viewer of a page; otherwise a redirect to sign in."""
    found = current_viewer(request)
    if found is None:
        raise SignInRequired()
    return found


def json_viewer(request: Request) -> Viewer:
    """``Depends``: the signed-in viewer of a JSON endpoint; otherwise 401."""
    found = current_viewer(request)
    if found is None:
        raise AuthError("sign in to the dashboard first")
    return found


# ---- rendering ---------------------------------------------------------------------


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["num"] = num
    env.filters["size"] = size
    env.filters["pretty"] = pretty
    env.globals["static"] = static_url
    return env


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "—"


def num(value: Any, digits: int = 4) -> str:
    """A number for a table: ints as they are, floats to ``digits`` significant digits."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def pretty(value: Any) -> str:
    """Indented JSON, escaped by the template like any other text."""
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def size(value: float | None) -> str:
    """A byte count as the CLI prints it (``316.0 KiB``); an em dash when unknown."""
    return "—" if value is None else binary_size(value)


STATIC_FILES = {
    "kiln.css": ("text/css; charset=utf-8", STATIC / "kiln.css"),
    "kiln.js": ("text/javascript; charset=utf-8", STATIC / "kiln.js"),
    "playground.js": ("text/javascript; charset=utf-8", STATIC / "playground.js"),
}


def plotly_js() -> Path:
    """plotly.js as the plotly Python package ships it (no CDN, works offline)."""
    from importlib.util import find_spec

    spec = find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError("the plotly package is not installed", field="plotly")
    return Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"


@cache
def static_url(name: str) -> str:
    """``/static/<name>?v=<content version>``: cacheable forever, new URL on change."""
    if name == "plotly.min.js":
        try:
            tag = version("plotly")
        except PackageNotFoundError:  # pragma: no cover - plotly is a dependency
            tag = "0"
    else:
        tag = hashlib.sha256(STATIC_FILES[name][1].read_bytes()).hexdigest()[:12]
    return f"/static/{name}?v={tag}"


def render(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    """A page from ``templates/<template>`` with the viewer, its CSRF token and headers."""
    who: Viewer | None = getattr(request.state, "viewer", None)
    html = (
        _environment()
        .get_template(template)
        .render(
            viewer=who,
            csrf=who.session.csrf if who is not None else "",
            path=request.url.path,
            **context,
        )
    )
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    titles = {403: "Not allowed", 404: "Not found", 409: "Conflict", 422: "Invalid request"}
    return render(
        request,
        "error.html",
        status=status,
        status_code=status,
        title=titles.get(status, "Error"),
        message=message,
    )


def sign_in_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    if COOKIE in request.cookies:
        clear_session_cookie(response, request)
    return response


class PageRoute(APIRoute):
    """A route answering HTML: errors become error pages, a missing sign-in a redirect."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired:
                return sign_in_redirect(request)
            except KilnError as exc:
                return error_page(request, exc.http_status, exc.message)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
                where = ".".join(str(p) for p in first.get("loc", ())[1:])
                return error_page(request, 422, f"{where}: {first['msg']}" if where else "invalid")
            except StarletteHTTPException as exc:
                return error_page(request, exc.status_code, str(exc.detail))

        return page_handler
