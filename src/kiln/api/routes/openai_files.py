"""OpenAI's Files API under ``/v1`` (:mod:`kiln.serve.openai_files`): fine-tuning files
as kiln datasets of the project.

- ``POST /v1/files`` (multipart ``file`` and ``purpose=fine-tune``; scope ``train``, as a
  dataset upload): checked line by line, stored, ``file-<dataset id>``.
- ``GET /v1/files``, ``GET /v1/files/{file_id}`` (scope ``read``).
- ``DELETE /v1/files/{file_id}`` (scope ``train``): datasets are immutable; a 400
  (code ``conflict``) that says so, nothing deleted.

The project: a project key's own; a global key's from the ``OpenAI-Project`` header
(the client's ``project=``) or the ``project`` query parameter, else ``default``.
Errors are in OpenAI's shape, like every ``/v1`` path.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, UploadFile
from sqlalchemy.orm import Session

from kiln.api.deps import Reader, ServicesDep, SessionDep, Trainer, principal, session
from kiln.data.scan import Limits
from kiln.errors import DataError
from kiln.jobs.scratch import own_scratch
from kiln.monitor import usage
from kiln.serve import openai_files as files
from kiln.services import Services
from kiln.store import datasets
from kiln.store.archives import ArchiveLimits
from kiln.store.artifacts import safe_segment
from kiln.store.keys import Principal
from kiln.store.projects import project_for
from kiln.store.tables import Project

router = APIRouter(tags=["openai"])


def openai_project(
    request: Request,
    s: Annotated[Session, Depends(session, scope="function")],
    who: Annotated[Principal, Depends(principal)],
    project: Annotated[
        str | None, Query(description="For a global key: the project to act on.")
    ] = None,
    openai_project: Annotated[
        str | None,
        Header(alias="OpenAI-Project", description="As the `project` query parameter."),
    ] = None,
) -> Project:
    """The project a ``/v1`` call acts on, in the request's transaction."""
    row = project_for(s, who, project or openai_project)
    request.state.project_id = row.id  # the audit record's project
    return row


OpenAIProject = Annotated[Project, Depends(openai_project)]


def _intake(s: Session, svc: Services, project: Project) -> datasets.Intake:
    """As a dataset upload's: the project's stored-bytes quota, the server's limits."""
    return datasets.Intake(
        s,
        svc.store,
        project,
        before_store=usage.stored_bytes_check(s, project.id),
        limits=Limits.of(svc.settings),
        archive_limits=ArchiveLimits.of(svc.settings),
    )


@router.post("/files", name="openai.files.create")
def create_file(
    file: Annotated[UploadFile, File(description="JSON lines in OpenAI's chat format.")],
    purpose: Annotated[
        Literal["fine-tune"], Form(description="fine-tune (the only purpose kiln takes).")
    ],
    _who: Trainer,
    project: OpenAIProject,
    s: SessionDep,
    svc: ServicesDep,
    request: Request,
) -> files.FileObject:
    """Check every line (messages with roles, an assistant answer) and store the file
    as a dataset; a bad line is a 400 naming it, and nothing is stored."""
    files.check_purpose(purpose)
    filename = safe_segment(file.filename or "", field="file")
    scratch = own_scratch(svc.settings.home_dir / "scratch")
    with tempfile.TemporaryDirectory(prefix="kiln-file-", dir=scratch) as tmp:
        local = Path(tmp) / "upload"
        with local.open("wb") as dst:
            shutil.copyfileobj(file.file, dst, 1 << 20)
        if local.stat().st_size == 0:
            raise DataError(f"{filename} is empty", field="file")
        row = files.upload(_intake(s, svc, project), filename=filename, path=local)
    request.state.audit_target = f"dataset:{row.id}"
    return files.file_object(row)


@router.get("/files", name="openai.files.list")
def list_files(
    _who: Reader,
    project: OpenAIProject,
    s: SessionDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> files.FileList:
    """The project's JSON-lines datasets, newest first (``order=asc``: oldest)."""
    if purpose is not None and purpose != files.PURPOSE:
        return files.FileList(data=[], has_more=False, first_id=None, last_id=None)
    return files.list_files(s, project, after=after, limit=limit, order=order)


@router.get("/files/{file_id}", name="openai.files.get")
def get_file(file_id: str, _who: Reader, project: OpenAIProject, s: SessionDep) -> files.FileObject:
    return files.file_object(files.get_file(s, project, file_id))


@router.delete("/files/{file_id}", name="openai.files.delete")
def delete_file(
    file_id: str, _who: Trainer, project: OpenAIProject, s: SessionDep, request: Request
) -> files.FileObject:
    """Deletes nothing: kiln's datasets are immutable (a 400, code ``conflict``)."""
    request.state.audit_target = f"dataset:{file_id.removeprefix(files.FILE_PREFIX)}"
    raise files.refuse_delete(files.get_file(s, project, file_id))
