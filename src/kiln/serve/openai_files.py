"""OpenAI's Files API over kiln datasets: a fine-tuning file is a dataset of the project.

A file's id is ``file-<dataset id>`` (``file-ds_…``); its bytes are the dataset's, stored
as :mod:`kiln.store.datasets` stores every upload (checked, fingerprinted, metered
against the project's stored-bytes quota, immutable). Only ``purpose: fine-tune`` is
taken, and only JSON lines in OpenAI's chat format: every line is checked by
:func:`kiln.data.dialogs.read_corpus` (roles, an assistant turn, no empty answer), and
a bad line is refused naming its number before anything is stored. The body is bounded
by ``KILN_MAX_UPLOAD_MB`` (as a dataset upload), the table by the server's dataset
limits, a line by 1 MiB (:data:`kiln.data.dialogs.MAX_LINE_BYTES`).

Listing shows the project's JSON-lines datasets (what a fine-tuning job can train on),
whether they came through ``/v1/files`` or ``/api/v1/datasets``.

Deleting: kiln datasets are immutable (jobs and model versions name them in their
lineage), so ``DELETE /v1/files/{id}`` deletes nothing and answers a ConflictError,
which OpenAI's error shape makes a 400 (code ``conflict``, param ``file_id``), rather
than a ``{"deleted": false}`` a client could mistake for success.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel
from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session

from kiln.data.dialogs import read_corpus
from kiln.errors import ConflictError, DataError, NotFoundError
from kiln.store import datasets
from kiln.store.tables import Dataset, Project

PURPOSE = "fine-tune"
FILE_PREFIX = "file-"
SUFFIX = ".jsonl"
JSONL = "jsonl"  # the format kiln records for a JSON-lines dataset


class FileObject(BaseModel):
    """OpenAI's ``file`` object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int  # Unix seconds
    filename: str
    purpose: Literal["fine-tune"] = "fine-tune"
    status: Literal["processed"] = "processed"  # checked when uploaded: never pending
    status_details: str | None = None
    expires_at: int | None = None  # kiln keeps datasets


class FileList(BaseModel):
    """A page of files (OpenAI's cursor page: ``after`` the last id for the next)."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


def unix(at: datetime | None) -> int | None:
    """``at`` in Unix seconds (naive times are UTC, as kiln stores them); None stays."""
    if at is None:
        return None
    return int((at if at.tzinfo is not None else at.replace(tzinfo=UTC)).timestamp())


def file_id(dataset_id: str) -> str:
    return FILE_PREFIX + dataset_id


def dataset_id_of(file: str, *, field: str) -> str:
    """The dataset id in ``file-<dataset id>``; NotFoundError naming ``field`` otherwise."""
    if not file.startswith(FILE_PREFIX) or len(file) == len(FILE_PREFIX):
        raise NotFoundError(f"no such file: {file[:80]!r} (ids look like file-ds_…)", field=field)
    return file.removeprefix(FILE_PREFIX)


def file_object(row: Dataset) -> FileObject:
    return FileObject(
        id=file_id(row.id),
        bytes=row.size_bytes,
        created_at=unix(row.created_at) or 0,
        filename=row.artifact_key.rsplit("/", 1)[-1],
    )


def check_purpose(purpose: str) -> None:
    if purpose != PURPOSE:
        raise DataError(
            f"purpose {purpose[:40]!r} is not supported: kiln takes files for fine-tune only",
            field="purpose",
        )


def check_chat_file(path: Path, filename: str) -> int:
    """Check ``path`` (sent as ``filename``) is OpenAI chat fine-tuning data, line by
    line; the number of chats. A DataError (field ``file``) names the first bad line."""
    if not filename.lower().endswith(SUFFIX):
        raise DataError(
            f"{filename}: a fine-tuning file is JSON lines in the chat format; name it *{SUFFIX}",
            field="file",
        )
    try:
        corpus = read_corpus(str(path), "chat")
    except DataError as exc:
        # the messages name the server's temporary copy: name the caller's file instead
        raise DataError(exc.message.replace(str(path), filename), field="file") from None
    return len(corpus.examples)


def upload(intake: datasets.Intake, *, filename: str, path: Path) -> Dataset:
    """Check ``path`` as chat JSON lines, then store it as a dataset of
    ``intake.project`` (named after the file, without its suffix); nothing is stored for
    a refused file."""
    check_chat_file(path, filename)
    name = filename[: -len(SUFFIX)] or "file"
    return datasets.ingest(intake, name=name, filename=filename, path=path)


def get_file(session: Session, project: Project, file: str) -> Dataset:
    """The JSON-lines dataset ``file`` names; a NotFoundError (field ``file_id``)."""
    try:
        row = datasets.get_dataset(session, project, dataset_id_of(file, field="file_id"))
    except NotFoundError:
        raise NotFoundError(f"no such file: {file[:80]!r}", field="file_id") from None
    if row.format != JSONL:
        raise NotFoundError(
            f"{file} is a {row.format} dataset, not a JSON-lines file", field="file_id"
        )
    return row


def list_files(
    session: Session,
    project: Project,
    *,
    after: str | None,
    limit: int,
    order: Literal["asc", "desc"],
) -> FileList:
    """The project's JSON-lines datasets by creation time, ``limit`` after the file
    ``after`` (a cursor: the last id of the previous page)."""
    where = [Dataset.project_id == project.id, Dataset.format == JSONL]
    newest = order == "desc"
    if after is not None:
        mark = get_file(session, project, after)
        where.append(_past(mark, newest))
    keys = (
        (Dataset.created_at.desc(), Dataset.id.desc())
        if newest
        else (
            Dataset.created_at,
            Dataset.id,
        )
    )
    rows = list(session.scalars(select(Dataset).where(*where).order_by(*keys).limit(limit + 1)))
    data = [file_object(r) for r in rows[:limit]]
    return FileList(
        data=data,
        has_more=len(rows) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


def _past(mark: Dataset, newest: bool) -> ColumnElement[bool]:
    """The rows after ``mark`` in (created_at, id) order, descending if ``newest``."""
    if newest:
        return or_(
            Dataset.created_at < mark.created_at,
            and_(Dataset.created_at == mark.created_at, Dataset.id < mark.id),
        )
    return or_(
        Dataset.created_at > mark.created_at,
        and_(Dataset.created_at == mark.created_at, Dataset.id > mark.id),
    )


def refuse_delete(row: Dataset) -> ConflictError:
    """Why a file is not deleted: kiln's datasets are immutable."""
    return ConflictError(
        f"{file_id(row.id)} was not deleted: kiln datasets are immutable (jobs and model "
        "versions name them in their lineage)",
        field="file_id",
    )
