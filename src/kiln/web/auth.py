"""Sign in with an API key, sign out.

A refused sign-in says only that it was refused: it never tells an unknown key from
a wrong secret, a revoked key or a project the key cannot open. A global admin key
opens the ``default`` project unless the form names another; a project key opens its
own project (naming a different one is refused like a wrong key).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from kiln.errors import AuthError, NotFoundError
from kiln.monitor.audit import record
from kiln.services import Services
from kiln.store.keys import Principal
from kiln.store.projects import project_for
from kiln.web.pages import PageRoute, Viewer, current_viewer, render, viewer, web_state
from kiln.web.session import (
    COOKIE,
    CSRF_FIELD,
    LOGIN_COOKIE,
    check_csrf,
    check_key,
    clear_login_cookie,
    clear_session_cookie,
    new_token,
    set_login_cookie,
    set_session_cookie,
)

router = APIRouter(route_class=PageRoute, include_in_schema=False)

REFUSED = "Sign-in refused: check the API key (and the project, if you named one)."


def safe_next(value: object) -> str:
    """A local path to go back to after signing in; anything else becomes ``/``."""
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or value.startswith(("//", "/\\"))
        or any(c in value for c in "\\\r\n\t")
        or value.startswith(("/login", "/logout"))
    ):
        return "/"
    return value


@router.get("/", name="web.index")
def index(request: Request) -> Response:
    target = "/jobs" if current_viewer(request) is not None else "/login"
    return RedirectResponse(target, status_code=303)


def _login_form(
    request: Request, *, next_path: str, status: int = 200, error: str | None = None
) -> Response:
    token = new_token()
    response = render(
        request,
        "login.html",
        status=status,
        login_csrf=token,
        next_path=next_path,
        error=error,
        title="Sign in",
    )
    set_login_cookie(response, request, token)
    return response


@router.get("/login", name="web.login_form")
def login_form(request: Request, next: str = "/") -> Response:
    if current_viewer(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_form(request, next_path=safe_next(next))


def _sign_in(svc: Services, key: str, project: str | None) -> tuple[Principal, int]:
    """The key's principal and project id if it may open ``project`` (None: its own or
    ``default``)."""
    who = check_key(svc, key)
    if who.project_id is not None and project is not None and project != who.project:
        raise AuthError("refused")
    with svc.db.session() as s:
        row = project_for(s, who, project if who.project_id is None else None)
        return who, row.id


def audit(
    svc: Services,
    who: Principal | None,
    project_id: int | None,
    action: str,
    outcome: str,
    status: int,
    target: str = "dashboard",
) -> None:
    """Record a dashboard action in the audit log, as the API records its own."""
    with svc.db.session() as s:
        record(
            s,
            action=action,
            target=target,
            outcome=outcome,
            status=status,
            key_id=who.key_id if who else None,
            project_id=project_id,
        )


@router.post("/login", name="web.login")
async def login(request: Request) -> Response:
    form = await request.form()
    check_csrf(request.cookies.get(LOGIN_COOKIE), form.get(CSRF_FIELD))
    svc: Services = request.app.state.services
    key = form.get("key")
    project_field = form.get("project")
    project = project_field.strip() if isinstance(project_field, str) else ""
    next_path = safe_next(form.get("next"))
    try:
        if not isinstance(key, str):
            raise AuthError("refused")
        who, project_id = await run_in_threadpool(_sign_in, svc, key.strip(), project or None)
    except (AuthError, NotFoundError):
        await run_in_threadpool(audit, svc, None, None, "web.login", "auth_error", 401)
        return _login_form(request, next_path=next_path, status=401, error=REFUSED)
    if "read" not in who.scopes and "admin" not in who.scopes:
        await run_in_threadpool(audit, svc, who, project_id, "web.login", "forbidden", 403)
        return _login_form(
            request,
            next_path=next_path,
            status=403,
            error="This key cannot read its project (it lacks the 'read' scope).",
        )
    sessions = web_state(request).sessions
    sessions.end(request.cookies.get(COOKIE))
    picked = (project or None) if who.project_id is None else None  # a global key picks
    sid = sessions.create(key.strip(), picked)
    await run_in_threadpool(audit, svc, who, project_id, "web.login", "ok", 303)
    response = RedirectResponse(next_path, status_code=303)
    set_session_cookie(response, request, sid)
    clear_login_cookie(response, request)
    return response


@router.post("/logout", name="web.logout")
async def logout(request: Request, who: Annotated[Viewer, Depends(viewer)]) -> Response:
    form = await request.form()
    check_csrf(who.session.csrf, form.get(CSRF_FIELD))
    web_state(request).sessions.end(who.sid)
    await run_in_threadpool(
        audit, who.services, who.principal, who.project.id, "web.logout", "ok", 303
    )
    response = RedirectResponse("/login", status_code=303)
    clear_session_cookie(response, request)
    return response
