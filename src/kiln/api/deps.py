"""What routes receive through ``Depends``: the services, the caller, the project, a page.

Tests override :func:`services` to point the app at their own database and store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session

from kiln.errors import AuthError
from kiln.jobs.queue import Queue
from kiln.settings import Settings
from kiln.store.artifacts import ArtifactStore
from kiln.store.db import Database
from kiln.store.keys import Principal, authenticate
from kiln.store.projects import project_for
from kiln.store.tables import Project


@dataclass
class Services:
    """Everything a request may use; built once per app."""

    settings: Settings
    db: Database
    store: ArtifactStore
    queue: Queue


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def session(svc: Annotated[Services, Depends(services)]) -> Iterator[Session]:
    """One transaction per request: committed if the route returns, rolled back if it raises."""
    with svc.db.session() as s:
        yield s


def principal(request: Request, svc: Annotated[Services, Depends(services)]) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("invalid or missing API key")
    with svc.db.session() as s:
        who = authenticate(s, token.strip())
    request.state.principal = who
    return who


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


@dataclass
class Page:
    limit: int
    offset: int


def page(
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page:
    return Page(limit, offset)


SessionDep = Annotated[Session, Depends(session, scope="function")]
ServicesDep = Annotated[Services, Depends(services)]
ProjectDep = Annotated[Project, Depends(project)]
PageDep = Annotated[Page, Depends(page)]
Reader = Annotated[Principal, Depends(Scope("read"))]
Trainer = Annotated[Principal, Depends(Scope("train"))]
Deployer = Annotated[Principal, Depends(Scope("deploy"))]
Admin = Annotated[Principal, Depends(Scope("admin"))]
