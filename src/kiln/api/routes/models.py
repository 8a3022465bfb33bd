"""The model registry: models, versions, aliases (``deploy``), bundle download (``read``)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from kiln.api.deps import Deployer, PageDep, ProjectDep, Reader, ServicesDep, SessionDep
from kiln.api.schemas import AliasIn, ModelOut, Page, VersionOut, model_out, page_of
from kiln.archive import pack_bundle
from kiln.store import registry
from kiln.store.tables import Alias, Model, ModelVersion

router = APIRouter(tags=["models"])


def version_out(s: Session, model: Model, row: ModelVersion) -> VersionOut:
    aliases = s.scalars(select(Alias.name).where(Alias.version_id == row.id).order_by(Alias.name))
    return VersionOut(
        model=model.name,
        version=row.version,
        id=row.id,
        task=row.task,
        metrics=row.metrics,
        summary=row.summary,
        job_id=row.job_id,
        dataset_id=row.dataset_id,
        parent_id=row.parent_id,
        size_bytes=row.size_bytes,
        aliases=list(aliases),
        created_at=row.created_at,
    )


@router.get("/models", name="models.list")
def list_(_who: Reader, project: ProjectDep, s: SessionDep, page: PageDep) -> Page[ModelOut]:
    rows, total = registry.list_models(s, project, limit=page.limit, offset=page.offset)
    items = [model_out(s, m) for m in rows]
    return Page[ModelOut](**page_of(items, total, page.limit, page.offset))


@router.get("/models/{name}", name="models.get")
def get(name: str, _who: Reader, project: ProjectDep, s: SessionDep) -> ModelOut:
    return model_out(s, registry.get_model(s, project, name))


@router.get("/models/{name}/versions", name="models.versions")
def versions(
    name: str, _who: Reader, project: ProjectDep, s: SessionDep, page: PageDep
) -> Page[VersionOut]:
    model = registry.get_model(s, project, name)
    rows, total = registry.list_versions(s, model, limit=page.limit, offset=page.offset)
    items = [version_out(s, model, r) for r in rows]
    return Page[VersionOut](**page_of(items, total, page.limit, page.offset))


@router.get("/models/{name}/versions/{version}", name="models.version")
def version(
    name: str, version: str, _who: Reader, project: ProjectDep, s: SessionDep
) -> VersionOut:
    """``version``: a number, ``latest`` or an alias."""
    model = registry.get_model(s, project, name)
    return version_out(s, model, registry.resolve_version(s, model, version))


@router.get("/models/{name}/versions/{version}/bundle", name="models.bundle")
def bundle(
    name: str, version: str, _who: Reader, project: ProjectDep, s: SessionDep, svc: ServicesDep
) -> FileResponse:
    """The bundle directory as a .tar.gz (what ``kiln.load`` reads once extracted)."""
    model = registry.get_model(s, project, name)
    row = registry.resolve_version(s, model, version)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bundle-"))
    folder = f"{model.name}-v{row.version}"
    archive = tmp / f"{folder}.tar.gz"
    try:
        svc.store.get_dir(row.artifact_key, tmp / folder)
        pack_bundle(tmp / folder, archive)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # decrypted files never outlive a failure
        raise
    shutil.rmtree(tmp / folder, ignore_errors=True)  # only the archive is sent

    return FileResponse(
        archive,
        media_type="application/gzip",
        filename=archive.name,
        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True),
    )


@router.put("/models/{name}/aliases/{alias}", name="models.set_alias")
def set_alias(
    name: str,
    alias: str,
    body: AliasIn,
    _who: Deployer,
    project: ProjectDep,
    s: SessionDep,
    request: Request,
) -> ModelOut:
    request.state.audit_target = f"model:{name}/alias:{alias}"
    model = registry.get_model(s, project, name)
    registry.set_alias(s, model, alias, body.version)
    return model_out(s, model)


@router.delete("/models/{name}/aliases/{alias}", name="models.delete_alias")
def delete_alias(
    name: str, alias: str, _who: Deployer, project: ProjectDep, s: SessionDep, request: Request
) -> ModelOut:
    request.state.audit_target = f"model:{name}/alias:{alias}"
    model = registry.get_model(s, project, name)
    registry.delete_alias(s, model, alias)
    return model_out(s, model)
