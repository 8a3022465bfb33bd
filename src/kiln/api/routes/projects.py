"""Projects and API keys (scope ``admin``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from kiln.api.deps import Admin, ServicesDep, SessionDep
from kiln.api.schemas import KeyIn, KeyOut, NewKeyOut, ProjectIn, ProjectOut
from kiln.errors import ForbiddenError, SpecError
from kiln.store import keys
from kiln.store.projects import create_project, list_projects, project_for
from kiln.store.tables import ApiKey, Project

router = APIRouter(tags=["projects and keys"])


@router.post("/projects", status_code=201, name="projects.create")
def create(body: ProjectIn, who: Admin, s: SessionDep, request: Request) -> ProjectOut:
    if not who.is_global_admin:
        raise ForbiddenError("only a global admin key creates projects", field="scopes")
    row = create_project(s, body.name)
    request.state.audit_target = f"project:{row.name}"
    return ProjectOut(name=row.name, created_at=row.created_at)


@router.get("/projects", name="projects.list")
def list_(who: Admin, s: SessionDep) -> list[ProjectOut]:
    return [ProjectOut(name=p.name, created_at=p.created_at) for p in list_projects(s, who)]


def _key_out(row: ApiKey, s: Any, **extra: Any) -> dict[str, Any]:
    project = s.get(Project, row.project_id) if row.project_id is not None else None
    return {
        "id": row.id,
        "name": row.name,
        "project": project.name if project else None,
        "scopes": row.scopes,
        "created_at": row.created_at,
        "revoked_at": row.revoked_at,
        "last_used_at": row.last_used_at,
        **extra,
    }


@router.post("/keys", status_code=201, name="keys.create")
def create_key(body: KeyIn, who: Admin, s: SessionDep, request: Request) -> NewKeyOut:
    """Issue a key; the response is the only time its secret is shown."""
    if body.project is None and who.is_global_admin:
        if "admin" not in body.scopes:
            # a key with no project acts on every project: only admins get one
            raise SpecError(
                "project: a key without the admin scope must belong to a project",
                field="project",
            )
        project_id = None  # another global admin key
    else:
        project_id = project_for(s, who, body.project).id
    row, secret = keys.create_key(s, project_id=project_id, scopes=body.scopes, name=body.name)
    request.state.audit_target = f"key:{row.id}"
    return NewKeyOut(**_key_out(row, s, key=secret))


@router.get("/keys", name="keys.list")
def list_keys(who: Admin, s: SessionDep) -> list[KeyOut]:
    return [KeyOut(**_key_out(row, s)) for row in keys.list_keys(s, who)]


@router.delete("/keys/{key_id}", name="keys.revoke")
def revoke_key(
    key_id: str,
    who: Admin,
    s: SessionDep,
    svc: ServicesDep,
    request: Request,
    confirm_self: Annotated[
        bool,
        Query(description="Needed to revoke the key the request is made with (else 409)."),
    ] = False,
) -> KeyOut:
    """Revoke a key. 409 for the last active global admin key (create another first),
    and for the caller's own key unless ``confirm_self=true``."""
    request.state.audit_target = f"key:{key_id}"
    out = KeyOut(**_key_out(keys.revoke(s, who, key_id, confirm_self=confirm_self), s))
    svc.keys.clear()  # the revoked key stops working now, not when its cache entry expires
    return out
