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
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypedDict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kiln.errors import DataError, KilnError, NotFoundError, ServiceError, TooLargeError
from kiln.store.archives import ArchiveLimits, Unpacked, is_archive, unpack
from kiln.store.artifacts import ArtifactStore, safe_key, safe_segment
from kiln.store.tables import Dataset, Project, UsageEvent

if TYPE_CHECKING:
    from kiln.data.scan import Limits
    from kiln.settings import Settings

PREFIX = "dataset:"


def dataset_ref(source: str) -> str | None:
    """The dataset id in a ``dataset:<id>`` source, else None."""
    return source.removeprefix(PREFIX) if source.startswith(PREFIX) else None


class StoredColumn(TypedDict):
    """One column as a dataset row stores it (``Dataset.columns``, shown by the API)."""

    name: str
    kind: str  # a kiln.data.schema.ColumnKind
    dtype: str  # the pandas dtype


@dataclass(frozen=True)
class TableInfo:
    """What a stored dataset holds: its format, row count and columns."""

    format: str
    rows: int
    columns: list[StoredColumn]


@dataclass(frozen=True)
class Intake:
    """Where a new dataset goes and what it must pass on the way: the caller's
    transaction, the artifact store, the owning project, a ``before_store(size_bytes)``
    check (a quota) and the table's and archive's limits (None: the defaults)."""

    session: Session
    store: ArtifactStore
    project: Project
    before_store: Callable[[int], None] | None = None
    limits: Limits | None = None
    archive_limits: ArchiveLimits | None = None

    def admit(self, size_bytes: int) -> str:
        """Run ``before_store`` (which may refuse by raising), then a new dataset id."""
        if self.before_store is not None:
            self.before_store(size_bytes)
        return "ds_" + secrets.token_hex(8)

    def key(self, dataset_id: str, name: str) -> str:
        """The artifact key of ``name`` in the dataset's folder."""
        return safe_key("projects", self.project.name, "datasets", dataset_id, name)


def inspect_table(path: Path, filename: str, limits: Limits | None = None) -> TableInfo:
    """Read a candidate file as kiln would and describe it: format, rows, columns.

    The file is streamed in bounded chunks (:func:`kiln.data.scan.scan_table`): past
    one of ``limits`` (default: :class:`~kiln.data.scan.Limits`) it is a TooLargeError
    naming the limit; anything kiln could not train on (an unknown format, bytes that
    are not UTF-8 text, a table with no rows) is a DataError with the reason.
    """
    from kiln.data.scan import Limits, scan_table

    scan = scan_table(path, filename, limits or Limits())
    columns = [StoredColumn(name=c.name, kind=c.kind, dtype=c.dtype) for c in scan.columns]
    return TableInfo(format=scan.format, rows=scan.rows, columns=columns)


def ingest(
    intake: Intake, *, name: str, filename: str, path: Path, source: str = "upload"
) -> Dataset:
    """Check ``path`` (within ``intake.limits``), store it and register it as a new
    dataset of ``intake.project``.

    ``intake.before_store(size_bytes)`` may refuse (raise) after the checks, before any
    write. A ``.zip``/``.tar.gz`` is a dataset archive (:func:`ingest_archive`).
    """
    safe_segment(name, field="name")
    safe_segment(filename, field="file")
    if is_archive(filename):
        return ingest_archive(intake, name=name, filename=filename, path=path, source=source)
    info = inspect_table(path, filename, intake.limits)
    size = path.stat().st_size
    dataset_id = intake.admit(size)
    key = intake.key(dataset_id, filename)
    intake.store.put_file(key, path)
    stored = _Stored(dataset_id, key, written=key, size_bytes=size, fingerprint=_sha256(path))
    return _register(intake, stored, name=name, source=source, info=info)


@dataclass(frozen=True)
class _Stored:
    """What was put in the artifact store for a dataset not registered yet."""

    dataset_id: str
    artifact_key: str  # the table, or an image folder's prefix
    written: str  # the key or prefix to delete if registering fails
    size_bytes: int
    fingerprint: str  # SHA-256 of the file as received


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _register(
    intake: Intake, stored: _Stored, *, name: str, source: str, info: TableInfo
) -> Dataset:
    """Add the dataset's row and its metered size; a failed insert removes what was
    stored (a key or a prefix): nothing stays for a dataset that was not registered."""
    row = Dataset(
        id=stored.dataset_id,
        project_id=intake.project.id,
        name=name,
        artifact_key=stored.artifact_key,
        source=source,
        format=info.format,
        fingerprint=stored.fingerprint,
        size_bytes=stored.size_bytes,
        rows=info.rows,
        columns=info.columns,
    )
    session = intake.session
    session.add(row)
    session.add(
        UsageEvent(
            project_id=row.project_id,
            kind="stored_bytes",
            quantity=float(row.size_bytes),
            subject=row.id,
        )
    )
    try:
        session.flush()
    except Exception:
        intake.store.delete(stored.written)
        raise
    return row


IMAGE_FOLDER_FORMAT = "images"  # an archive of one folder of images per class
WITH_IMAGES = "+images"  # "<table format>+images": an archive of a table and its images


def archive_root(dataset: Dataset) -> str | None:
    """The artifact prefix an archive dataset's files lie under; None for a single table.

    An image folder's ``artifact_key`` is that prefix; a table's is its table, at the top.
    """
    if dataset.format == IMAGE_FOLDER_FORMAT:
        return dataset.artifact_key
    if dataset.format.endswith(WITH_IMAGES):
        return dataset.artifact_key.rsplit("/", 1)[0]
    return None


def ingest_archive(
    intake: Intake, *, name: str, filename: str, path: Path, source: str = "upload"
) -> Dataset:
    """Unpack an archive within ``intake.archive_limits`` (:mod:`kiln.store.archives`),
    check what it holds and store its files under ``projects/<p>/datasets/<id>/files/``.

    It holds either one table at its top (checked within ``intake.limits``) beside the
    images its image column names (format ``<table>+images``), or an image folder: one
    sub-folder of images per class (format ``images``; columns ``image`` and
    ``label``). A refused archive stores nothing.
    """
    with tempfile.TemporaryDirectory(prefix="kiln-unpack-", dir=path.parent) as tmp:
        limits = intake.archive_limits or ArchiveLimits()
        unpacked = unpack(path, filename, Path(tmp) / "files", limits)
        info = _describe_archive(unpacked, filename, intake.limits)
        dataset_id = intake.admit(unpacked.size_bytes)
        prefix = intake.key(dataset_id, "files")
        try:
            intake.store.put_dir(prefix, unpacked.root)
        except BaseException:
            intake.store.delete(prefix)
            raise
        key = prefix
        if unpacked.table is not None:
            key = f"{prefix}/{unpacked.table.relative_to(unpacked.root).as_posix()}"
    stored = _Stored(
        dataset_id, key, written=prefix, size_bytes=unpacked.size_bytes, fingerprint=_sha256(path)
    )
    return _register(intake, stored, name=name, source=source, info=info)


def _describe_archive(unpacked: Unpacked, filename: str, limits: Limits | None) -> TableInfo:
    """The unpacked archive's table (its first rows' image paths checked), or its image
    folder as a table of ``image`` and ``label``; a DataError naming ``file`` if neither."""
    from kiln.data.images import FOLDER_IMAGE_COLUMN, check_path_columns, folder_table
    from kiln.data.scan import read_head

    if unpacked.table is not None:
        info = inspect_table(unpacked.table, unpacked.table.name, limits)
        # image paths of the first rows, checked now (a job checks every row it reads)
        check_path_columns(read_head(unpacked.table, unpacked.table.name), unpacked.root)
        return TableInfo(info.format + WITH_IMAGES, info.rows, info.columns)
    try:
        frame = folder_table(unpacked.root)
    except DataError:
        raise DataError(
            f"{filename} holds neither a table at its top nor an image folder "
            "(one sub-folder of images per class)",
            field="file",
        ) from None
    columns = [
        StoredColumn(name=FOLDER_IMAGE_COLUMN, kind="image", dtype="object"),
        StoredColumn(name="label", kind="categorical", dtype="object"),
    ]
    return TableInfo(IMAGE_FOLDER_FORMAT, len(frame), columns)


@dataclass(frozen=True)
class ImportSources:
    """Where :func:`import_uri` may copy a table from, and how much of one: s3:// objects
    (at ``s3_endpoint_url``; None: AWS's), server paths under one of ``data_roots``, at
    most ``max_bytes`` (None: no limit)."""

    data_roots: Sequence[Path]
    s3_endpoint_url: str | None = None
    max_bytes: int | None = None

    @classmethod
    def of(cls, settings: Settings) -> ImportSources:
        """The server's: ``KILN_DATA_ROOTS``, ``KILN_S3_ENDPOINT_URL``, and the upload
        limit ``KILN_MAX_UPLOAD_MB``."""
        return cls(
            data_roots=settings.data_roots,
            s3_endpoint_url=settings.s3_endpoint_url,
            max_bytes=int(settings.max_upload_mb * (1 << 20)),
        )


def import_uri(
    intake: Intake, *, name: str, uri: str, sources: ImportSources, scratch: Path | None = None
) -> Dataset:
    """Copy a table from ``uri`` (s3://… or a path under one of ``sources.data_roots``)
    and ingest it (:func:`ingest`; the copy lives in ``scratch``, default the system's
    temp folder). A source over ``sources.max_bytes`` is a 413, found as it is copied.

    Local paths outside the configured roots are refused: a server must not read
    whatever file a caller names.
    """
    filename = uri.rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="kiln-import-", dir=scratch) as tmp:
        local = Path(tmp) / "data"
        with local.open("wb") as dst:
            if uri.startswith("s3://"):
                _copy_s3(uri, dst, sources.s3_endpoint_url, sources.max_bytes)
            else:
                _copy_local(uri, dst, sources.data_roots, sources.max_bytes)
        return ingest(intake, name=name, filename=filename, path=local, source=uri)


def _copy_s3(uri: str, dst: IO[bytes], endpoint_url: str | None, max_bytes: int | None) -> None:
    """Copy an S3 object; its failures become errors naming ``uri`` (:func:`s3_error`)."""
    import fsspec

    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}
    try:
        with fsspec.open(uri, "rb", **options) as src:
            _bounded_copy(src, dst, max_bytes)
    except TooLargeError:
        raise
    except FileNotFoundError:
        raise NotFoundError(f"{uri} not found", field="uri") from None
    except Exception as exc:  # botocore's errors are not OSErrors: classify them all
        raise s3_error(uri, exc) from None


def _copy_local(
    uri: str, dst: IO[bytes], data_roots: Sequence[Path], max_bytes: int | None
) -> None:
    """Copy a server file, only from under one of ``data_roots``."""
    try:
        path = Path(uri.removeprefix("file://")).resolve()
    except (ValueError, OSError):  # a NUL byte, a name the OS cannot take
        raise DataError("not a path kiln can read", field="uri") from None
    if not any(path.is_relative_to(root.resolve()) for root in data_roots):
        raise DataError(
            "only s3:// URIs or paths under KILN_DATA_ROOTS can be registered",
            field="uri",
        )
    if not path.is_file():
        raise NotFoundError(f"{uri} not found", field="uri")
    with path.open("rb") as src:
        _bounded_copy(src, dst, max_bytes)


def _bounded_copy(src: IO[bytes], dst: IO[bytes], max_bytes: int | None) -> None:
    """Copy in 1 MiB chunks; past ``max_bytes`` stop with a 413 (nothing is kept)."""
    copied = 0
    while chunk := src.read(1 << 20):
        copied += len(chunk)
        if max_bytes is not None and copied > max_bytes:
            raise TooLargeError(
                f"the source is larger than KILN_MAX_UPLOAD_MB ({max_bytes / (1 << 20):g} MiB)",
                field="uri",
            )
        dst.write(chunk)


# botocore's exceptions by class name (botocore is imported only with s3fs)
_S3_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"}
_S3_DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken"}
_S3_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"}


def s3_error(uri: str, exc: Exception) -> KilnError:
    """The error a failed S3 read is to the caller, naming the URI (never a 500).

    Missing or refused credentials and bad URIs are the request's to fix (422); an
    unreachable or failing S3 service is a 502.
    """
    names = {cls.__name__ for cls in type(exc).__mro__}
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    if names & _S3_CREDENTIALS:
        return DataError(f"cannot read {uri}: the server has no S3 credentials", field="uri")
    if isinstance(exc, PermissionError) or code in _S3_DENIED:
        return DataError(
            f"cannot read {uri}: S3 refused the server's credentials ({code or 'access denied'})",
            field="uri",
        )
    if isinstance(exc, ValueError):
        return DataError(f"cannot read {uri}: not a valid S3 URI", field="uri")
    if names & _S3_UNREACHABLE or isinstance(exc, ConnectionError | TimeoutError):
        return ServiceError(f"cannot read {uri}: the S3 endpoint cannot be reached", field="uri")
    if isinstance(exc, OSError):
        return DataError(f"cannot read {uri}: {exc}", field="uri")
    return ServiceError(f"cannot read {uri}: S3 failed ({type(exc).__name__})", field="uri")


def get_dataset(session: Session, project: Project, dataset_id: str) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None or row.project_id != project.id:
        raise NotFoundError(f"dataset {dataset_id} not found", field="dataset_id")
    return row


def column_names(dataset: Dataset) -> list[str]:
    """The names of a dataset's columns, in order, as stored when it was ingested."""
    columns: list[StoredColumn] = dataset.columns or []
    return [c["name"] for c in columns]


def list_datasets(
    session: Session, project: Project, *, limit: int, offset: int
) -> tuple[list[Dataset], int]:
    where = Dataset.project_id == project.id
    total = session.scalar(select(func.count()).select_from(Dataset).where(where)) or 0
    rows = session.scalars(
        select(Dataset).where(where).order_by(Dataset.created_at.desc()).limit(limit).offset(offset)
    )
    return list(rows), total
