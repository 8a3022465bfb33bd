"""Datasets: tables checked, fingerprinted and copied into the artifact store, immutable.

A dataset is accepted only if kiln can read it as a table with at least one row; the
file is then stored under ``projects/<project>/datasets/<id>/`` and never changed.
A rejected file leaves nothing behind. Specs refer to a dataset as
``data.source: dataset:<id>``. Storing one meters its size (a ``stored_bytes`` usage
event in the same transaction); a caller's ``before_store`` check (a quota) runs
once the size is known and before anything is stored.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kiln.errors import DataError, NotFoundError
from kiln.store.artifacts import ArtifactStore, safe_key, safe_segment
from kiln.store.tables import Dataset, Project, UsageEvent

PREFIX = "dataset:"


def dataset_ref(source: str) -> str | None:
    """The dataset id in a ``dataset:<id>`` source, else None."""
    return source.removeprefix(PREFIX) if source.startswith(PREFIX) else None


def inspect_table(path: Path, filename: str) -> dict[str, Any]:
    """Read a candidate file as kiln would and describe it: format, rows, columns.

    Raises DataError (with the reason) for anything kiln could not train on: an
    unknown format, bytes that are not text in UTF-8, a table with no rows.
    """
    from kiln.data.schema import infer_kind
    from kiln.data.sources import read_table, table_format

    try:
        fmt = table_format(filename)
    except DataError as exc:
        raise DataError(exc.message, field="file") from None
    if fmt in ("csv", "tsv", "jsonl"):
        _check_utf8(path, filename)
    try:
        frame = read_table(str(path), fmt)
    except DataError as exc:
        raise DataError(exc.message.replace(str(path), filename), field="file") from None
    columns = [
        {"name": str(name), "kind": infer_kind(frame[name]), "dtype": str(frame[name].dtype)}
        for name in frame.columns
    ]
    return {"format": fmt, "rows": int(frame.shape[0]), "columns": columns}


def _check_utf8(path: Path, filename: str) -> None:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    seen = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
                seen += len(chunk)
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{filename} is not UTF-8 text (byte {seen + exc.start}): "
                    "save it as UTF-8 and upload again",
                    field="file",
                ) from None
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{filename} ends inside a UTF-8 character", field="file") from None


def ingest(
    session: Session,
    store: ArtifactStore,
    project: Project,
    *,
    name: str,
    filename: str,
    path: Path,
    source: str = "upload",
    before_store: Callable[[int], None] | None = None,
) -> Dataset:
    """Check ``path``, store it and register it as a new dataset of ``project``.

    ``before_store(size_bytes)`` may refuse (raise) after the checks, before any write.
    """
    safe_segment(name, field="name")
    safe_segment(filename, field="file")
    info = inspect_table(path, filename)
    size = path.stat().st_size
    if before_store is not None:
        before_store(size)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    dataset_id = "ds_" + secrets.token_hex(8)
    key = safe_key("projects", project.name, "datasets", dataset_id, filename)
    store.put_file(key, path)
    row = Dataset(
        id=dataset_id,
        project_id=project.id,
        name=name,
        artifact_key=key,
        source=source,
        format=info["format"],
        fingerprint=digest.hexdigest(),
        size_bytes=size,
        rows=info["rows"],
        columns=info["columns"],
    )
    session.add(row)
    session.add(
        UsageEvent(
            project_id=project.id, kind="stored_bytes", quantity=float(size), subject=dataset_id
        )
    )
    try:
        session.flush()
    except Exception:
        store.delete(key)  # nothing stored for a dataset that was not registered
        raise
    return row


def import_uri(
    session: Session,
    store: ArtifactStore,
    project: Project,
    *,
    name: str,
    uri: str,
    data_roots: list[Path],
    s3_endpoint_url: str | None = None,
    before_store: Callable[[int], None] | None = None,
) -> Dataset:
    """Copy a table from ``uri`` (s3://… or a path under one of ``data_roots``) and ingest it.

    Local paths outside the configured roots are refused: a server must not read
    whatever file a caller names.
    """
    filename = uri.rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="kiln-import-") as tmp:
        local = Path(tmp) / "data"
        if uri.startswith("s3://"):
            import fsspec

            options = (
                {"client_kwargs": {"endpoint_url": s3_endpoint_url}} if s3_endpoint_url else {}
            )
            try:
                with fsspec.open(uri, "rb", **options) as src, local.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
            except FileNotFoundError:
                raise NotFoundError(f"{uri} not found", field="uri") from None
            except OSError as exc:
                raise DataError(f"cannot read {uri}: {exc}", field="uri") from None
        else:
            path = Path(uri.removeprefix("file://")).resolve()
            if not any(path.is_relative_to(root.resolve()) for root in data_roots):
                raise DataError(
                    "only s3:// URIs or paths under KILN_DATA_ROOTS can be registered",
                    field="uri",
                )
            if not path.is_file():
                raise NotFoundError(f"{uri} not found", field="uri")
            shutil.copyfile(path, local)
        return ingest(
            session,
            store,
            project,
            name=name,
            filename=filename,
            path=local,
            source=uri,
            before_store=before_store,
        )


def get_dataset(session: Session, project: Project, dataset_id: str) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None or row.project_id != project.id:
        raise NotFoundError(f"dataset {dataset_id} not found", field="dataset_id")
    return row


def list_datasets(
    session: Session, project: Project, *, limit: int, offset: int
) -> tuple[list[Dataset], int]:
    where = Dataset.project_id == project.id
    total = session.scalar(select(func.count()).select_from(Dataset).where(where)) or 0
    rows = session.scalars(
        select(Dataset).where(where).order_by(Dataset.created_at.desc()).limit(limit).offset(offset)
    )
    return list(rows), total
