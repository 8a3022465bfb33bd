"""Projects: the tenant boundary. Every dataset, job and model belongs to one."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kiln.errors import ConflictError, NotFoundError, SpecError
from kiln.store.keys import Principal
from kiln.store.tables import Project

DEFAULT_PROJECT = "default"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def check_name(name: str, *, field: str = "name", what: str = "name") -> str:
    """Names that become URLs and storage paths: lowercase letters, digits, '-' and '_'."""
    if not NAME.match(name or ""):
        raise SpecError(
            f"{what} {name!r} must be 1-64 characters of a-z, 0-9, '-' or '_', "
            "starting with a letter or digit",
            field=field,
        )
    return name


def create_project(session: Session, name: str) -> Project:
    check_name(name, what="project name")
    if session.scalar(select(Project).where(Project.name == name)) is not None:
        raise ConflictError(f"project {name!r} already exists", field="name")
    row = Project(name=name)
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise ConflictError(f"project {name!r} already exists", field="name") from None
    return row


def ensure_project(session: Session, name: str) -> Project:
    row = session.scalar(select(Project).where(Project.name == name))
    return row if row is not None else create_project(session, name)


def list_projects(session: Session, principal: Principal) -> list[Project]:
    query = select(Project).order_by(Project.name)
    if not principal.is_global_admin:
        query = query.where(Project.id == principal.project_id)
    return list(session.scalars(query))


def project_for(session: Session, principal: Principal, requested: str | None) -> Project:
    """The project a call acts on.

    A project key acts on its own project (naming another one answers 404, as if it
    did not exist); a global admin key acts on ``requested``, or on ``default``.
    """
    if principal.project_id is not None:
        if requested is not None and requested != principal.project:
            raise NotFoundError(f"project {requested!r} not found", field="project")
        row = session.get(Project, principal.project_id)
    else:
        name = requested or DEFAULT_PROJECT
        row = session.scalar(select(Project).where(Project.name == name))
        if row is None:
            raise NotFoundError(f"project {name!r} not found", field="project")
    assert row is not None
    return row
