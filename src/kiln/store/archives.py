"""Dataset archives (.zip, .tar.gz, .tgz): unpacked with limits, never trusted.

An archive holds an image folder (one sub-folder per class) or a table plus the images
its image column names. :func:`unpack` writes it into an empty local folder and
refuses, before the caller stores anything:

- member names that could leave the folder or are not artifact-key segments:
  absolute paths, ``..``, drive letters, backslashes, NUL, names outside
  ``A-Z a-z 0-9 . _ -`` (422, naming the member);
- anything but regular files and folders: symlinks, hard links, devices, FIFOs,
  encrypted zip entries (422);
- more than ``max_files`` members or more than ``max_bytes`` of content in all (413,
  naming the limit's variable). Sizes are counted on the bytes actually
  decompressed, as they stream, never taken from the headers (a zip entry can claim
  any size).

Hidden files and folders (``.DS_Store``, ``__MACOSX/``) that archivers add are skipped.
One top folder wrapping everything (``pics/cat/1.png``) is unwrapped, so a zipped
folder and a zip of its contents give the same dataset.
"""

from __future__ import annotations

import gzip
import stat
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from kiln.errors import DataError, TooLargeError
from kiln.settings import Settings
from kiln.store.artifacts import safe_segment

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".jsonl", ".ndjson", ".json")
MAX_DEPTH = 32  # folders deep; deeper is no dataset layout anyone uses
_CHUNK = 1 << 20
# tarfile reads a member's data in the chunks we ask for (_CHUNK); any larger single
# read is a pax or GNU long-name header, which tarfile would hold in memory whole.
_MAX_HEADER_READ = _CHUNK


@dataclass(frozen=True)
class ArchiveLimits:
    """How much one archive may unpack to (``KILN_MAX_ARCHIVE_FILES``, the
    decompressed-bytes cap ``KILN_MAX_DECOMPRESSED_MB``)."""

    max_files: int = 100_000
    max_bytes: int = 2048 << 20

    @classmethod
    def of(cls, settings: Settings) -> ArchiveLimits:
        return cls(
            max_files=settings.max_archive_files,
            max_bytes=int(settings.max_decompressed_mb * (1 << 20)),
        )


@dataclass(frozen=True)
class Unpacked:
    """What an archive held: its root folder, and the one table at the top (if any)."""

    root: Path
    files: int
    size_bytes: int
    table: Path | None


def is_archive(filename: str) -> bool:
    """Whether an upload's name says it is a dataset archive."""
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def unpack(archive: Path, filename: str, dest: Path, limits: ArchiveLimits) -> Unpacked:
    """Unpack ``archive`` (named ``filename``, which gives its kind) into ``dest``.

    ``dest`` must not exist yet. Raises DataError (422, field ``file``) for an unsafe
    or unreadable archive and TooLargeError (413) past a limit; then ``dest`` may hold
    part of the archive, and the caller removes it (it is only ever a temporary folder).
    """
    dest.mkdir(parents=True)
    budget = _Budget(limits)
    seen: set[PurePosixPath] = set()
    try:
        if filename.lower().endswith(".zip"):
            _unzip(archive, dest, budget, seen)
        else:
            _untar(archive, dest, budget, seen)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{filename} is not a readable archive: {exc}", field="file") from None
    if budget.files == 0:
        raise DataError(f"{filename} holds no files", field="file")
    root = _unwrapped(dest)
    return Unpacked(root, budget.files, budget.bytes, find_table(root))


def find_table(root: Path) -> Path | None:
    """The table at the top of an unpacked dataset; DataError if there are several."""
    tables = sorted(
        p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES)
    )
    if len(tables) > 1:
        names = ", ".join(p.name for p in tables)
        raise DataError(
            f"the archive holds several tables at its top ({names}); keep one", field="file"
        )
    return tables[0] if tables else None


# ---- limits ----------------------------------------------------------------------------


class _Budget:
    """Counts members and decompressed bytes; raises as soon as one is over."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.files = 0
        self.bytes = 0
        self.members = 0

    def member(self) -> None:
        self.members += 1  # folders count too: a million empty folders is a bomb as well
        if self.members > self.limits.max_files:
            raise TooLargeError(
                f"the archive holds more than {self.limits.max_files} files or folders "
                "(KILN_MAX_ARCHIVE_FILES)",
                field="file",
            )

    def add(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_bytes:
            raise TooLargeError(
                f"the archive unpacks to more than {self.limits.max_bytes / (1 << 20):.6g} MiB "
                "(KILN_MAX_DECOMPRESSED_MB)",
                field="file",
            )


# ---- member names ----------------------------------------------------------------------


def _member_path(name: str) -> PurePosixPath | None:
    """The member's safe relative path; None for an archiver's hidden file (skipped)."""
    shown = name[:200]
    if "\x00" in name or "\\" in name:
        raise DataError(f"archive member {shown!r}: NUL or backslash in its name", field="file")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"archive member {shown!r}: absolute paths are refused", field="file")
    path = PurePosixPath(name)  # drops "." segments and a trailing "/"
    if ".." in path.parts:
        raise DataError(f"archive member {shown!r}: '..' is refused", field="file")
    if not path.parts:
        return None  # "./" itself
    if any(p.startswith(".") or p == "__MACOSX" for p in path.parts):
        return None
    if len(path.parts) > MAX_DEPTH:
        raise DataError(
            f"archive member {shown!r}: more than {MAX_DEPTH} folders deep", field="file"
        )
    for part in path.parts:
        try:
            safe_segment(part, field="file")
        except DataError:
            raise DataError(
                f"archive member {shown!r}: names may use A-Z a-z 0-9 . _ - only "
                "(1-128 characters)",
                field="file",
            ) from None
    return path


def _target(dest: Path, path: PurePosixPath, seen: set[PurePosixPath], is_dir: bool) -> Path:
    """Where a member goes; refuses a second member of the same path or one below a file."""
    for parent in list(path.parents)[:-1]:
        if parent in seen and not (dest / parent).is_dir():
            raise DataError(f"archive member {str(path)!r} lies inside a file", field="file")
    if path in seen and not is_dir:
        raise DataError(f"archive member {str(path)!r} appears twice", field="file")
    seen.add(path)
    out = dest.joinpath(*path.parts)
    if out.exists() and out.is_dir() != is_dir:
        raise DataError(f"archive member {str(path)!r} is both a file and a folder", field="file")
    return out


def _write(src: IO[bytes], out: Path, budget: _Budget) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # "x": never follow or replace anything already there (only this unpack writes here)
    with out.open("xb") as dst:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            budget.add(len(chunk))
            dst.write(chunk)


# ---- zip -------------------------------------------------------------------------------


def _unzip(archive: Path, dest: Path, budget: _Budget, seen: set[PurePosixPath]) -> None:
    _check_central_directory(archive, budget.limits.max_files)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            budget.member()
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                what = "a symlink" if kind == stat.S_IFLNK else "not a regular file"
                raise DataError(
                    f"archive member {info.filename[:200]!r} is {what}: "
                    "only files and folders are allowed",
                    field="file",
                )
            if info.flag_bits & 0x1:
                raise DataError(
                    f"archive member {info.filename[:200]!r} is encrypted", field="file"
                )
            path = _member_path(info.filename)
            if path is None:
                continue
            if info.is_dir():
                _target(dest, path, seen, True).mkdir(parents=True, exist_ok=True)
                continue
            out = _target(dest, path, seen, False)
            with zf.open(info) as src:
                _write(src, out, budget)
            budget.files += 1


# A central-directory entry: 46 fixed bytes, then name, extra field and comment.
_CD_ENTRY = struct.Struct("<4s24xHHH12x")
_MAX_CD_BYTES = 64 << 20  # 100k entries with long names take ~15 MiB


def _check_central_directory(archive: Path, max_files: int) -> None:
    """Count the entries of the central directory before ``zipfile`` parses it.

    ``zipfile`` reads the whole directory into memory and builds one object per entry
    (~500 bytes each, from ~50 on disk), whatever the end record's entry count claims,
    so a 200 MB upload of empty entries would cost the API process gigabytes. Here the
    directory is walked header by header, where ``zipfile`` will look for it (its own
    end-record reader, so both agree), and refused past ``max_files`` entries or
    ``_MAX_CD_BYTES``. A directory that is not well formed is left to ``zipfile``,
    which refuses it.
    """
    with archive.open("rb") as fh:
        end = zipfile._EndRecData(fh)  # type: ignore[attr-defined]  # stdlib, stable since 2.x
        if not end:
            return
        size_cd, location = end[5], end[9]
        start = location - size_cd
        if end[0] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
            start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
        if size_cd > _MAX_CD_BYTES:
            raise TooLargeError(
                f"the archive's directory is {size_cd / (1 << 20):.1f} MiB "
                f"(at most {_MAX_CD_BYTES >> 20} MiB)",
                field="file",
            )
        fh.seek(max(0, start))
        count, seen = 0, 0
        while seen + _CD_ENTRY.size <= size_cd:
            head = fh.read(_CD_ENTRY.size)
            if len(head) < _CD_ENTRY.size:
                return
            signature, name, extra, comment = _CD_ENTRY.unpack(head)
            if signature != b"PK\x01\x02":
                return
            count += 1
            if count > max_files:
                raise TooLargeError(
                    f"the archive holds more than {max_files} files or folders "
                    "(KILN_MAX_ARCHIVE_FILES)",
                    field="file",
                )
            fh.seek(name + extra + comment, 1)
            seen += _CD_ENTRY.size + name + extra + comment


# ---- tar -------------------------------------------------------------------------------


class _BoundedReader:
    """A forward-only view of the decompressed tar stream for tarfile's ``r:`` mode.

    Refuses a read larger than any member chunk (a header tarfile would buffer whole)
    and any position past the byte budget plus tar's own framing.
    """

    def __init__(self, raw: Any, limit: int) -> None:
        self.raw = raw
        self.limit = limit

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > _MAX_HEADER_READ:
            raise DataError("the archive has an oversized tar header", field="file")
        data: bytes = self.raw.read(n)
        self._check()
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        # refuse before gzip decompresses its way to a target past the budget
        target = offset if whence == 0 else self.raw.tell() + offset if whence == 1 else None
        if target is not None and target > self.limit:
            self._refuse()
        pos: int = self.raw.seek(offset, whence)
        self._check()
        return pos

    def tell(self) -> int:
        return int(self.raw.tell())

    def _check(self) -> None:
        if self.raw.tell() > self.limit:
            self._refuse()

    def _refuse(self) -> None:
        raise TooLargeError(
            f"the archive unpacks to more than {self.limit / (1 << 20):.6g} MiB "
            "(KILN_MAX_DECOMPRESSED_MB)",
            field="file",
        )


def _untar(archive: Path, dest: Path, budget: _Budget, seen: set[PurePosixPath]) -> None:
    # headers and padding: 512 bytes a member, plus up to 511 of padding each
    limit = budget.limits.max_bytes + 1024 * (budget.limits.max_files + 2)
    with gzip.open(archive, "rb") as raw:
        reader = _BoundedReader(raw, limit)
        with tarfile.open(fileobj=reader, mode="r:") as tar:  # type: ignore[call-overload]
            for member in _members(tar):
                budget.member()
                if not (member.isreg() or member.isdir()):
                    what = (
                        "a symlink"
                        if member.issym()
                        else "a hard link"
                        if member.islnk()
                        else "a device or FIFO"
                    )
                    raise DataError(
                        f"archive member {member.name[:200]!r} is {what}: "
                        "only files and folders are allowed",
                        field="file",
                    )
                path = _member_path(member.name)
                if path is None:
                    budget.add(member.size)  # skipped, but still decompressed to pass it
                    continue
                if member.isdir():
                    _target(dest, path, seen, True).mkdir(parents=True, exist_ok=True)
                    continue
                out = _target(dest, path, seen, False)
                src = tar.extractfile(member)
                assert src is not None  # a regular file
                with src:
                    _write(src, out, budget)
                budget.files += 1


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members one at a time; tarfile keeps a list of those seen, bounded by max_files."""
    while True:
        member = tar.next()
        if member is None:
            return
        yield member


def _unwrapped(dest: Path) -> Path:
    """``dest``, or the one folder it holds when that is all it holds."""
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        inner = list(entries[0].iterdir())
        # an image folder of one class is no wrapper: a class folder holds images only
        if any(p.is_dir() for p in inner) or any(
            p.name.lower().endswith(TABLE_SUFFIXES) for p in inner
        ):
            return entries[0]
    return dest
