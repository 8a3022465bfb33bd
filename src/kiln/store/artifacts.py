"""The artifact store: bundles, datasets and reports as files under one root, via fsspec.

Two backends share one code path: a local directory (the embedded default) and
``s3://bucket/prefix`` on any S3-compatible server. Keys are ``/``-joined relative
paths made of :func:`safe_segment` segments; every method re-validates every key it
is given, so no caller can name a path outside the root. Local writes are atomic
(temporary file in the same directory, then ``os.replace``); an S3 PUT is atomic by
nature. A key cannot be both an artifact and the prefix of others (a filesystem
forbids it; keep to that on S3 too). The bucket of an S3 store must already exist.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from kiln.errors import DataError, NotFoundError

# A leading "." is refused: it rules out "." and "..", hidden files, and the store's own
# temporary files (".tmp-*"), which therefore can never collide with a key.
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_NOT_FOUND = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def safe_segment(value: str, *, field: str) -> str:
    """Return ``value`` if it is one safe path segment, else raise :class:`DataError`.

    Allowed: 1-128 characters of ``A-Z a-z 0-9 . _ -``, not starting with ``.``. This
    excludes ``.``/``..``, separators (``/`` and ``\\``), control characters and ``%``,
    so URL-encoded traversals (``%2e%2e``, ``%2f``, ``%252e``) are refused too.
    """
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value):
        raise DataError(
            f"invalid name {str(value)[:80]!r}: use 1-128 characters of A-Z a-z 0-9 . _ -, "
            "not starting with '.'",
            field=field,
        )
    return value


def safe_key(*segments: str) -> str:
    """Join validated segments into a key: ``safe_key("models", "7", "kiln.json")``."""
    if not segments:
        raise DataError("an artifact key needs at least one segment", field="key")
    return "/".join(safe_segment(s, field="key") for s in segments)


def _check_key(key: str, *, allow_root: bool = False) -> str:
    """Validate every ``/``-separated segment of ``key``; ``""`` only where ``allow_root``."""
    if allow_root and key == "":
        return key
    if not isinstance(key, str):
        raise DataError(f"an artifact key must be a string, not {type(key).__name__}", field="key")
    for segment in key.split("/"):
        safe_segment(segment, field="key")
    return key


class ArtifactStore(Protocol):
    """Files under one root, addressed by validated relative keys."""

    url: str

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def put_file(self, key: str, path: str | Path) -> None: ...
    def get_file(self, key: str, path: str | Path) -> None: ...
    def put_dir(self, prefix: str, directory: str | Path) -> list[str]: ...
    def get_dir(self, prefix: str, directory: str | Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def total_size(self, prefix: str) -> int: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key_or_prefix: str) -> None: ...


class FsspecStore:
    """An :class:`ArtifactStore` over an fsspec filesystem ``fs``, rooted at ``root``.

    ``get_bytes``, ``get_file``, ``get_dir`` and ``size`` raise :class:`NotFoundError`
    for a missing key; ``list`` and ``total_size`` see only keys strictly below
    ``prefix/`` (``""`` means the whole store); ``exists`` is true for a stored file,
    not for a prefix; ``delete`` removes a key or a whole prefix, missing is fine.
    """

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- hooks the local store overrides -------------------------------------------
    def _path(self, key: str, *, allow_root: bool = False) -> str:
        key = _check_key(key, allow_root=allow_root)
        return f"{self.root}/{key}" if key else self.root

    def _put_bytes(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)  # one PUT: all or nothing
        self.fs.invalidate_cache(path)

    def _put_file(self, path: str, local: str) -> None:
        self.fs.put_file(local, path)  # a multipart upload appears only once complete
        self.fs.invalidate_cache(path)

    def _find(self, prefix: str) -> dict[str, int]:
        """Valid keys strictly below ``prefix/`` (``""``: all) mapped to their sizes."""
        base = self._path(prefix, allow_root=True)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        start = len(self.root) + 1
        out: dict[str, int] = {}
        for path, info in found.items():
            key = path.rstrip("/")[start:]
            if prefix and not key.startswith(prefix + "/"):
                continue
            if info.get("type", "file") != "file" or not _valid(key):
                continue  # foreign files and our own temporary files are not keys
            out[key] = int(info.get("size") or 0)
        return out

    # -- the contract ---------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> None:
        self._put_bytes(self._path(key), data)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            data: bytes = self.fs.cat_file(path)
        except _NOT_FOUND as e:
            raise NotFoundError(f"no artifact {key!r} in {self.url}", field="key") from e
        return data

    def put_file(self, key: str, path: str | Path) -> None:
        target = self._path(key)
        if not Path(path).is_file():
            raise NotFoundError(f"no file {str(path)!r} to store", field="path")
        self._put_file(target, str(path))

    def get_file(self, key: str, path: str | Path) -> None:
        source = self._path(key)
        try:
            src = self.fs.open(source, "rb")
        except _NOT_FOUND as e:
            raise NotFoundError(f"no artifact {key!r} in {self.url}", field="key") from e
        with src:
            _atomic_write(str(path), lambda f: _copy(src, f))

    def put_dir(self, prefix: str, directory: str | Path) -> list[str]:
        return put_dir(self, prefix, directory)

    def get_dir(self, prefix: str, directory: str | Path) -> None:
        get_dir(self, prefix, directory)

    def exists(self, key: str) -> bool:
        return bool(self.fs.isfile(self._path(key)))

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            info = self.fs.info(path)
        except _NOT_FOUND:
            info = {}
        if info.get("type") != "file":
            raise NotFoundError(f"no artifact {key!r} in {self.url}", field="key")
        return int(info["size"])

    def total_size(self, prefix: str) -> int:
        return sum(self._find(prefix).values())

    def list(self, prefix: str) -> list[str]:
        return sorted(self._find(prefix))

    def delete(self, key_or_prefix: str) -> None:
        path = self._path(key_or_prefix)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache()


def put_dir(store: ArtifactStore, prefix: str, directory: str | Path) -> list[str]:
    """Upload every file below ``directory`` to ``prefix/<relative path>`` with
    ``store.put_file``; the keys written.

    All names are validated before anything is written. A symlink is uploaded as
    its content only if it is a file inside ``directory``; otherwise it is refused.
    """
    _check_key(prefix)
    top = Path(directory)
    if not top.is_dir():
        raise NotFoundError(f"no directory {str(directory)!r} to store", field="path")
    files = sorted(_walk(top, top.resolve()))
    keys = [_check_key(f"{prefix}/{rel}") for rel, _ in files]
    for key, (_, path) in zip(keys, files, strict=True):
        store.put_file(key, path)
    return keys


def get_dir(store: ArtifactStore, prefix: str, directory: str | Path) -> None:
    """Download every key below ``prefix/`` into ``directory`` with ``store.get_file``."""
    keys = store.list(_check_key(prefix))
    if not keys:
        raise NotFoundError(f"no artifacts under {prefix!r} in {store.url}", field="key")
    top = Path(directory)
    for key in keys:
        store.get_file(key, top.joinpath(*key[len(prefix) + 1 :].split("/")))


class LocalStore(FsspecStore):
    """A directory; created on first write. Paths that resolve outside it are refused."""

    def _path(self, key: str, *, allow_root: bool = False) -> str:
        path = super()._path(key, allow_root=allow_root)
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if real != real_root and not real.startswith(real_root + os.sep):
            raise DataError(f"artifact {key!r} resolves outside the store", field="key")
        return path

    def _put_bytes(self, path: str, data: bytes) -> None:
        self._atomic(path, lambda f: _write_all(f, data))

    def _put_file(self, path: str, local: str) -> None:
        with open(local, "rb") as src:
            self._atomic(path, lambda f: _copy(src, f))

    def _atomic(self, path: str, write: Callable[[IO[bytes]], None]) -> None:
        try:
            _atomic_write(path, write)
        except (IsADirectoryError, NotADirectoryError, FileExistsError) as e:
            # "a" and "a/b" cannot both be files on a filesystem
            key = path[len(self.root) + 1 :]
            raise DataError(f"{key!r} clashes with a stored key or prefix", field="key") from e

    def _find(self, prefix: str) -> dict[str, int]:
        found = super()._find(prefix)
        real_root = os.path.realpath(self.root) + os.sep
        return {
            k: n
            for k, n in found.items()
            if os.path.realpath(f"{self.root}/{k}").startswith(real_root)
        }


def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    sse: str | None = None,
    sse_kms_key_id: str | None = None,
) -> ArtifactStore:
    """Open ``url``: a directory path, ``file://`` URL or ``s3://bucket[/prefix]``.

    ``endpoint_url`` selects an S3-compatible server (MinIO, ...) and is ignored for a
    directory. S3 credentials come from the standard AWS environment/config chain.
    ``sse`` (``AES256`` or ``aws:kms``) and ``sse_kms_key_id`` ask S3 to encrypt every
    object it stores (server-side encryption); a directory ignores them.
    """
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].strip("/").partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise DataError(f"invalid S3 bucket name {bucket!r}", field="artifacts")
        root = bucket + (f"/{prefix}" if prefix else "")
        if prefix:
            for segment in prefix.split("/"):
                safe_segment(segment, field="artifacts")
        import s3fs

        # fsspec shares one instance per (endpoint, options, process): clients are made
        # once, and different endpoints never share one. No listings cache, so exists and
        # list see every writer's changes at once.
        extra: dict[str, str] = {}
        if sse:
            extra["ServerSideEncryption"] = sse
            if sse_kms_key_id:
                extra["SSEKMSKeyId"] = sse_kms_key_id
        fs = s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": endpoint_url},
            use_listings_cache=False,
            s3_additional_kwargs=extra,
        )
        return FsspecStore(fs, root, f"s3://{root}")
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        raise DataError(
            f"unsupported artifact store {url!r}: use a directory or s3://bucket/prefix",
            field="artifacts",
        )
    from fsspec.implementations.local import LocalFileSystem

    root = os.path.abspath(os.path.expanduser(url))
    return LocalStore(LocalFileSystem(), root, root)


def _valid(key: str) -> bool:
    return all(_SEGMENT.fullmatch(s) for s in key.split("/"))


def _write_all(f: IO[bytes], data: bytes) -> None:
    f.write(data)


def _copy(src: IO[bytes], dst: IO[bytes], chunk: int = 1 << 20) -> None:
    while block := src.read(chunk):
        dst.write(block)


def _atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` via a temporary file in its directory, then ``os.replace``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _walk(top: Path, real_top: Path, rel: str = "") -> list[tuple[str, Path]]:
    """``(relative key, path)`` of every file below ``top``, refusing escaping symlinks."""
    out: list[tuple[str, Path]] = []
    for entry in sorted(top.iterdir()):
        name = f"{rel}/{entry.name}" if rel else entry.name
        if entry.is_symlink():
            target = entry.resolve()
            if not target.is_relative_to(real_top) or not target.is_file():
                raise DataError(f"refusing to store symlink {name!r}", field="path")
            out.append((name, entry))
        elif entry.is_dir():
            out.extend(_walk(entry, real_top, name))
        elif entry.is_file():
            out.append((name, entry))
    return out
