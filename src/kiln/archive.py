"""Bundle archives: the .tar.gz a server sends a bundle directory as, and its safe unpacking."""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

from kiln.errors import ServiceError


def pack_bundle(directory: Path, archive: Path) -> Path:
    """Write ``directory`` to ``archive`` (.tar.gz) under one top folder of its own name."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(directory, arcname=directory.name)
    return archive


def extract_bundle(archive: Path, dest: Path) -> Path:
    """Extract a bundle .tar.gz into ``dest``; the one top-level directory it holds.

    Refuses (``ServiceError``) any archive with a member outside one top folder, an
    absolute path, ``..``, a link or anything but plain files and directories; the
    extraction itself runs with tarfile's ``data`` filter as a second guard.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            tops = {_checked_top(m) for m in members}
            if len(tops) != 1:
                raise ServiceError(
                    f"bundle archive must hold one top folder, not {sorted(tops) or 'none'}"
                )
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ServiceError(f"bundle archive could not be extracted: {exc}") from None
    top = dest / tops.pop()
    if not top.is_dir():
        raise ServiceError(f"bundle archive holds no folder {top.name!r}")
    return top


def _checked_top(member: tarfile.TarInfo) -> str:
    """The member's top-level folder; ServiceError if the member is unsafe."""
    path = PurePosixPath(member.name)
    unsafe = (
        not (member.isfile() or member.isdir())
        or path.is_absolute()
        or ".." in path.parts
        or "\\" in member.name
        or not path.parts
    )
    if unsafe:
        raise ServiceError(f"refusing unsafe bundle archive member {member.name!r}")
    return path.parts[0]
