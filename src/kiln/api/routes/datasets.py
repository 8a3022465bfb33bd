"""Datasets: upload a table or import one by URI (scope ``train``), list and read (``read``)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from sqlalchemy.orm import Session

from kiln.api.deps import PageDep, ProjectDep, Reader, ServicesDep, SessionDep, Trainer
from kiln.api.schemas import DatasetImport, DatasetOut, Page, page_of
from kiln.data.scan import Limits
from kiln.errors import DataError
from kiln.jobs.scratch import own_scratch
from kiln.monitor import usage
from kiln.services import Services
from kiln.store import datasets
from kiln.store.archives import ArchiveLimits
from kiln.store.artifacts import safe_segment
from kiln.store.tables import Dataset, Project

router = APIRouter(tags=["datasets"])


def _intake(s: Session, svc: Services, project: Project) -> datasets.Intake:
    """Where an upload or import goes: ``project`` in the request's transaction, within
    the project's stored-bytes quota and the server's table and archive limits."""
    return datasets.Intake(
        s,
        svc.store,
        project,
        before_store=usage.stored_bytes_check(s, project.id),
        limits=Limits.of(svc.settings),
        archive_limits=ArchiveLimits.of(svc.settings),
    )


def dataset_out(row: Dataset) -> DatasetOut:
    return DatasetOut(
        id=row.id,
        name=row.name,
        format=row.format,
        source=row.source,
        fingerprint=row.fingerprint,
        size_bytes=row.size_bytes,
        rows=row.rows,
        columns=row.columns,
        created_at=row.created_at,
        ref=f"{datasets.PREFIX}{row.id}",
    )


@router.post("/datasets", status_code=201, name="datasets.upload")
def upload(
    file: Annotated[
        UploadFile,
        File(
            description="A .csv, .tsv, .jsonl or .parquet table, or a .zip/.tar.gz/.tgz "
            "archive of an image folder (one sub-folder per class) or of a table and its images."
        ),
    ],
    _who: Trainer,
    project: ProjectDep,
    s: SessionDep,
    svc: ServicesDep,
    request: Request,
    name: Annotated[str | None, Form(description="Default: the file name without suffix.")] = None,
) -> DatasetOut:
    """Check the table (readable, UTF-8, at least one row), store it, return its id.

    A rejected file stores nothing. The body size limit is ``KILN_MAX_UPLOAD_MB``; the
    table's ``KILN_MAX_DATASET_ROWS``, ``KILN_MAX_DATASET_CELLS`` and (once
    decompressed) ``KILN_MAX_DECOMPRESSED_MB`` (413 past one).
    """
    filename = safe_segment(file.filename or "", field="file")
    name = name if name is not None else filename.split(".", 1)[0]
    safe_segment(name, field="name")
    intake = _intake(s, svc, project)
    # under $KILN_HOME/scratch, not /tmp: removed on any error here, and by the next
    # start if this process is killed meanwhile
    scratch = own_scratch(svc.settings.home_dir / "scratch")
    with tempfile.TemporaryDirectory(prefix="kiln-upload-", dir=scratch) as tmp:
        local = Path(tmp) / "upload"
        with local.open("wb") as dst:
            shutil.copyfileobj(file.file, dst, 1 << 20)
        if local.stat().st_size == 0:
            raise DataError(f"{filename} is empty", field="file")
        row = datasets.ingest(intake, name=name, filename=filename, path=local)
    request.state.audit_target = f"dataset:{row.id}"
    return dataset_out(row)


@router.post("/datasets/import", status_code=201, name="datasets.import")
def import_(
    body: DatasetImport,
    _who: Trainer,
    project: ProjectDep,
    s: SessionDep,
    svc: ServicesDep,
    request: Request,
) -> DatasetOut:
    """Copy a table from an S3 URI (or a server path under ``KILN_DATA_ROOTS``) and register it."""
    row = datasets.import_uri(
        _intake(s, svc, project),
        name=body.name,
        uri=body.uri,
        sources=datasets.ImportSources.of(svc.settings),
        scratch=own_scratch(svc.settings.home_dir / "scratch"),
    )
    request.state.audit_target = f"dataset:{row.id}"
    return dataset_out(row)


@router.get("/datasets", name="datasets.list")
def list_(_who: Reader, project: ProjectDep, s: SessionDep, page: PageDep) -> Page[DatasetOut]:
    rows, total = datasets.list_datasets(s, project, limit=page.limit, offset=page.offset)
    items = [dataset_out(r) for r in rows]
    return Page[DatasetOut](**page_of(items, total, page.limit, page.offset))


@router.get("/datasets/{dataset_id}", name="datasets.get")
def get(dataset_id: str, _who: Reader, project: ProjectDep, s: SessionDep) -> DatasetOut:
    return dataset_out(datasets.get_dataset(s, project, dataset_id))
