"""The web dashboard that ``kiln up`` serves at ``/``: sign in with an API key, then
jobs (live curves), models (lineage, compression trade-offs), deployments (canary and
swap forms, live panel), datasets (column statistics), usage and the audit log.

Server-rendered Jinja2 pages; charts drawn by the plotly.js that ships inside the
plotly package, served from ``/static/plotly.min.js`` (no CDN, works offline).
"""

from __future__ import annotations

import gzip
from functools import cache
from typing import Annotated

from fastapi import APIRouter, FastAPI, Header, Query
from fastapi.responses import Response

from kiln.errors import NotFoundError

router = APIRouter(include_in_schema=False)
IMMUTABLE = "public, max-age=31536000, immutable"


@cache
def _plotly_gzip() -> bytes:
    from kiln.web.pages import plotly_js

    return gzip.compress(plotly_js().read_bytes(), compresslevel=6, mtime=0)


@router.get("/static/{name}", name="web.static")
def static(
    name: str,
    v: Annotated[str | None, Query()] = None,
    accept_encoding: Annotated[str, Header()] = "",
) -> Response:
    """The dashboard's CSS and JavaScript, and plotly.js (gzipped when the browser takes it)."""
    from kiln.web.pages import STATIC_FILES, plotly_js

    cache_control = IMMUTABLE if v else "no-cache"
    if name == "plotly.min.js":
        headers = {"Cache-Control": cache_control, "Vary": "Accept-Encoding"}
        media = "text/javascript; charset=utf-8"
        if "gzip" in accept_encoding.lower():
            headers["Content-Encoding"] = "gzip"
            return Response(_plotly_gzip(), media_type=media, headers=headers)
        return Response(plotly_js().read_bytes(), media_type=media, headers=headers)
    if name not in STATIC_FILES:
        raise NotFoundError(f"no static file {name!r}", field="name")
    media, path = STATIC_FILES[name]
    return Response(path.read_bytes(), media_type=media, headers={"Cache-Control": cache_control})


def mount(app: FastAPI) -> None:
    """Add the dashboard's routes and its in-memory state (sessions, profiles) to ``app``."""
    from kiln.web import auth, deployments, playground, views
    from kiln.web.pages import WebState
    from kiln.web.profile import ProfileCache

    app.state.web = WebState(profiles=ProfileCache())
    for module_router in (
        router,
        auth.router,
        views.api,
        views.router,
        deployments.api,
        deployments.router,
        playground.api,
        playground.router,
    ):
        app.include_router(module_router)
