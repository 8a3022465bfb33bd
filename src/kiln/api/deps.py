"""What routes receive through ``Depends``: the services, the caller, the project, a page.

The :class:`~kiln.services.Services` come from ``app.state.services``, which the
application's assembly (:func:`kiln.app.create_app`) sets; tests pass their own.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from kiln.api.ratelimit import lane_of
from kiln.errors import AuthError
from kiln.services import STATIC_PRINCIPAL, Services
from kiln.store.db import MAX_OFFSET
from kiln.store.keys import Principal, authenticate
from kiln.store.projects import project_for
from kiln.store.tables import Project


async def services(request: Request) -> Services:
    # async (like every dependency that does no I/O): a sync one costs a thread hop
    svc: Services = request.app.state.services
    return svc


def session(svc: Annotated[Services, Depends(services)]) -> Iterator[Session]:
    """One transaction per request: committed if the route returns, rolled back if it raises."""
    with svc.db.session() as s:
        yield s


async def principal(request: Request, svc: Annotated[Services, Depends(services)]) -> Principal:
    """The caller; a key seen in the last seconds is answered from the cache on the event
    loop, only a database read goes to a thread. Counts the request against the key's
    and its project's rate limits (``kiln.api.ratelimit``; 429 past one)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("invalid or missing API key")
    token = token.strip()
    who = svc.keys.get(token)
    if who is None:
        if svc.static_key is not None and hmac.compare_digest(token, svc.static_key):
            who = STATIC_PRINCIPAL
        else:
            who = await run_in_threadpool(_authenticate, svc, token)
        svc.keys.put(token, who)
    request.state.principal = who
    lane = lane_of(request.scope)
    if lane is not None:
        await svc.rate.check(who, lane)
    return who


def _authenticate(svc: Services, token: str) -> Principal:
    with svc.db.session() as s:
        return authenticate(s, token)


class Scope:
    """``Depends(Scope("train"))``: the caller, who must hold that scope."""

    def __init__(self, scope: str) -> None:
        self.scope = scope

    def __call__(self, who: Annotated[Principal, Depends(principal)]) -> Principal:
        who.require(self.scope)
        return who


def project(
    request: Request,
    s: Annotated[Session, Depends(session, scope="function")],
    who: Annotated[Principal, Depends(principal)],
    project: Annotated[
        str | None, Query(description="For a global admin key: the project to act on.")
    ] = None,
) -> Project:
    row = project_for(s, who, project)
    request.state.project_id = row.id
    return row


def project_alone(
    request: Request,
    svc: Annotated[Services, Depends(services)],
    who: Annotated[Principal, Depends(principal)],
    project: Annotated[
        str | None, Query(description="For a global admin key: the project to act on.")
    ] = None,
) -> Project:
    """The project, looked up in a transaction of its own that is closed at once.

    For routes that hold no request session (deployments): on SQLite a session kept
    open across the route would hold the write lock that the route's own work needs.
    """
    with svc.db.session() as s:
        row = project_for(s, who, project)
    request.state.project_id = row.id
    return row


@dataclass
class Page:
    limit: int
    offset: int


def page(
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page:
    return Page(limit, offset)


SessionDep = Annotated[Session, Depends(session, scope="function")]
ServicesDep = Annotated[Services, Depends(services)]
ProjectDep = Annotated[Project, Depends(project)]
ProjectAlone = Annotated[Project, Depends(project_alone)]
PageDep = Annotated[Page, Depends(page)]
Reader = Annotated[Principal, Depends(Scope("read"))]
Trainer = Annotated[Principal, Depends(Scope("train"))]
Deployer = Annotated[Principal, Depends(Scope("deploy"))]
Admin = Annotated[Principal, Depends(Scope("admin"))]
