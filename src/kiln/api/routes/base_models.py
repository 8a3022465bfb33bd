"""The base-model catalog: any key with ``read`` lists it; only a global admin adds or removes.

Project users must see what they can fine-tune (``model.path: base:<name>``), but only
the platform's owner decides what lies on its disk: ``source`` is read by the server.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from kiln.api.deps import Admin, Reader, ServicesDep, SessionDep
from kiln.api.schemas import Strict
from kiln.errors import ForbiddenError
from kiln.store import catalog
from kiln.store.keys import Principal

router = APIRouter(tags=["base models"])

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
NameParam = Path(pattern=NAME_PATTERN, description="The catalog name (base:<name> in specs).")


class BaseModelIn(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Specs name it as base:<name>.")
    source: str = Field(
        min_length=1,
        max_length=1024,
        description="On the server: a Hugging Face model directory, a GGUF file, "
        "pkg:<package>/<dir>, or a hub id (only with KILN_ALLOW_HUB=1).",
    )


class PinnedFileOut(BaseModel):
    path: str
    sha256: str
    size: int


class BaseModelOut(BaseModel):
    name: str
    ref: str = Field(description="What a spec's model.path uses: base:<name>.")
    kind: str = Field(description="hf_dir or gguf.")
    source: str | None = Field(
        description="What it was registered from; shown to global admin keys only (a path "
        "on the server says nothing a project needs)."
    )
    sha256: str = Field(description="SHA-256 over the sorted (path, sha256) list.")
    size_bytes: int
    files: list[PinnedFileOut]
    created_at: datetime
    created_by: str | None


def _out(info: catalog.BaseModelInfo, who: Principal) -> BaseModelOut:
    return BaseModelOut(
        name=info.name,
        ref=info.ref,
        kind=info.kind,
        source=info.source if who.is_global_admin else None,
        sha256=info.sha256,
        size_bytes=info.size_bytes,
        files=[PinnedFileOut(path=f.path, sha256=f.sha256, size=f.size) for f in info.files],
        created_at=info.created_at,
        created_by=info.created_by,
    )


def _global_admin(who: Principal) -> None:
    if not who.is_global_admin:
        raise ForbiddenError("only a global admin key adds or removes base models", field="scopes")


@router.get("/base-models", name="base_models.list")
def list_(who: Reader, s: SessionDep) -> list[BaseModelOut]:
    return [_out(info, who) for info in catalog.list_base_models(s)]


@router.get("/base-models/{name}", name="base_models.get")
def get(who: Reader, s: SessionDep, name: str = NameParam) -> BaseModelOut:
    return _out(catalog.get_base_model(s, name), who)


# add and remove hold no request session: the copy runs outside any transaction
@router.post("/base-models", status_code=201, name="base_models.add")
def add(body: BaseModelIn, who: Admin, svc: ServicesDep, request: Request) -> BaseModelOut:
    """Copy ``source`` into the artifact store, pin every file's SHA-256, and name it."""
    request.state.audit_target = f"base-model:{body.name}"
    _global_admin(who)
    info = catalog.register(
        svc.db,
        svc.store,
        body.name,
        body.source,
        allow_hub=svc.settings.allow_hub,
        created_by=who.key_id,
    )
    return _out(info, who)


@router.delete("/base-models/{name}", name="base_models.remove")
def remove(who: Admin, svc: ServicesDep, request: Request, name: str = NameParam) -> BaseModelOut:
    """Remove the entry and its files; jobs that still name it fail when they start."""
    request.state.audit_target = f"base-model:{name}"
    _global_admin(who)
    return _out(catalog.remove_base_model(svc.db, svc.store, name), who)
