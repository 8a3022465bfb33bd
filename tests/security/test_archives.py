"""Probes of dataset archives: zip-slip, links, devices, file-count and size bombs.

Each archive is built byte by byte in the test and uploaded to the real app (the
in-process ``Platform`` of tests/api/conftest.py) with a ``train`` key. A refused archive
is a 4xx naming the member or the limit's variable, and leaves nothing behind: no
dataset row, no artifact, no usage event, and no file outside the upload's scratch
folder (the traversal's target is looked for where it would have landed).
"""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api.conftest import Platform
from kiln.errors import DataError, TooLargeError
from kiln.store.archives import ArchiveLimits, unpack
from kiln.store.tables import Dataset, UsageEvent


def png(value: int = 100) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def tar_of(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def folder_members(n: int = 2) -> dict[str, bytes]:
    return {f"{c}/{i}.png": png(50 + 100 * k) for k, c in enumerate("ab") for i in range(n)}


def zip_symlink(name: str, target: str) -> bytes:
    """A zip whose member is a symlink (Unix mode S_IFLNK in the external attributes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        info = zipfile.ZipInfo(name)
        info.create_system = 3  # Unix
        info.external_attr = (0o120777 << 16) & 0xFFFF0000
        zf.writestr(info, target)
        zf.writestr("a/1.png", png())
    return out.getvalue()


def lying_zip(real: bytes, claimed: int) -> bytes:
    """One stored-deflated entry whose headers claim ``claimed`` bytes uncompressed."""
    data = bytearray(zip_of({"a/zeros.png": real}))
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, claimed)
    struct.pack_into("<I", data, central + 24, claimed)
    return bytes(data)


def assert_nothing_stored(p: Platform) -> None:
    assert p.count(Dataset) == 0
    assert p.count(UsageEvent) == 0
    assert p.artifact_files() == {}
    scratch = p.settings.home_dir / "scratch"
    leftovers = [f for f in scratch.rglob("*") if f.is_file()] if scratch.exists() else []
    assert leftovers == []


@pytest.fixture
def small(make_platform: Callable[..., Platform]) -> Platform:
    """A server whose archives may hold 20 files and 1 MiB."""
    return make_platform(max_archive_files=20, max_decompressed_mb=1)


# ---- through the API: refused, nothing stored --------------------------------------------


@pytest.mark.parametrize(
    ("filename", "archive", "says"),
    [
        ("slip.zip", zip_of({"a/1.png": png(), "../../evil.png": png()}), "'..' is refused"),
        ("slip2.zip", zip_of({"a/../../../evil.png": png()}), "'..' is refused"),
        ("abs.zip", zip_of({"/tmp/evil.png": png()}), "absolute"),
        ("drive.zip", zip_of({"C:/evil.png": png()}), "absolute"),
        ("back.zip", zip_of({"a\\..\\..\\evil.png": png()}), "backslash"),
        ("slip.tar.gz", tar_of([("a/1.png", png()), ("../evil.png", png())]), "'..' is refused"),
        ("abs.tgz", tar_of([("/tmp/evil.png", png())]), "absolute"),
        ("sym.tar.gz", tar_of([link("a/1.png", "/etc/passwd", tarfile.SYMTYPE)]), "a symlink"),
        (
            "hard.tar.gz",
            tar_of([("a/1.png", png()), link("b/2.png", "/etc/passwd", tarfile.LNKTYPE)]),
            "a hard link",
        ),
        ("dev.tar.gz", tar_of([link("a/zero", "", tarfile.CHRTYPE)]), "a device"),
        ("fifo.tar.gz", tar_of([link("a/fifo", "", tarfile.FIFOTYPE)]), "a device or FIFO"),
        ("sym.zip", zip_symlink("a/evil.png", "/etc/passwd"), "a symlink"),
        ("space.zip", zip_of({"a/my cat.png": png()}), "A-Z a-z 0-9"),
        ("twice.tar.gz", tar_of([("a/1.png", png()), ("a/1.png", png())]), "twice"),
        ("notzip.zip", b"PK\x03\x04 this is no zip", "not a readable archive"),
        ("nogz.tar.gz", b"\x1f\x8b broken", "not a readable archive"),
        ("empty.zip", zip_of({}), "holds no files"),
        ("loose.zip", zip_of({"1.png": png(), "2.png": png()}), "neither a table"),
    ],
)
def test_unsafe_archives_are_refused_and_store_nothing(
    platform: Platform, tmp_path: Path, filename: str, archive: bytes, says: str
) -> None:
    key = platform.create_key("default", ["read", "train"])
    r = platform.upload(key, archive, filename)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "file"
    assert says in error["message"]
    assert_nothing_stored(platform)
    # the traversal's targets: beside the scratch folder, the home, the artifact root
    home = platform.settings.home_dir
    for where in (home, home.parent, home / "scratch", Path("/tmp")):
        assert not (where / "evil.png").exists()


def test_too_many_files_is_a_413_naming_the_limit(small: Platform) -> None:
    key = small.create_key("default", ["read", "train"])
    members = {f"a/{i}.png": png() for i in range(15)} | {f"b/{i}.png": png() for i in range(15)}
    for filename, archive in (
        ("many.zip", zip_of(members)),
        ("many.tar.gz", tar_of(list(members.items()))),
    ):
        r = small.upload(key, archive, filename)
        assert r.status_code == 413, r.text
        assert "KILN_MAX_ARCHIVE_FILES" in r.json()["error"]["message"]
    # a million empty folders would be a bomb as well: folders count
    folders = [link(f"d{i}/", "", tarfile.DIRTYPE) for i in range(30)]
    r = small.upload(key, tar_of([*folders, ("a/1.png", png())]), "dirs.tar.gz")
    assert r.status_code == 413, r.text
    assert_nothing_stored(small)


def test_size_bombs_are_413_and_store_nothing(small: Platform) -> None:
    key = small.create_key("default", ["read", "train"])
    zeros = bytes(8 << 20)  # 8 MiB of zeros: a few kB compressed, 8x the limit
    bombs = {
        "bomb.zip": zip_of({"a/1.png": png(), "a/zeros.png": zeros}),
        "bomb.tar.gz": tar_of([("a/1.png", png()), ("a/zeros.png", zeros)]),
        # many small members that add up past the limit
        "sum.zip": zip_of({f"a/{i}.png": bytes(200_000) for i in range(8)}),
    }
    for filename, archive in bombs.items():
        assert len(archive) < 100_000  # the upload itself is small
        r = small.upload(key, archive, filename)
        assert r.status_code == 413, (filename, r.text)
        assert "KILN_MAX_DECOMPRESSED_MB" in r.json()["error"]["message"]
    assert_nothing_stored(small)


def test_a_zip_entry_that_lies_about_its_size_is_refused(small: Platform) -> None:
    # the headers claim 10 bytes; the data inflates to 8 MiB: whatever zipfile makes of
    # it, no more than the limit is ever written, and nothing is stored
    key = small.create_key("default", ["read", "train"])
    r = small.upload(key, lying_zip(bytes(8 << 20), claimed=10), "liar.zip")
    assert r.status_code in (413, 422), r.text
    assert_nothing_stored(small)


# ---- unpack itself --------------------------------------------------------------------


def test_unpack_counts_the_bytes_it_writes_not_the_headers(tmp_path: Path) -> None:
    archive = tmp_path / "liar.zip"
    archive.write_bytes(lying_zip(bytes(3 << 20), claimed=3 << 20 >> 4))
    with pytest.raises((TooLargeError, DataError)):
        unpack(archive, "liar.zip", tmp_path / "out", ArchiveLimits(max_bytes=1 << 20))
    written = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*") if f.is_file())
    assert written <= 1 << 20


def test_a_good_archive_unpacks_under_its_wrapper_folder(tmp_path: Path) -> None:
    members = {f"pics/{k}": v for k, v in folder_members(3).items()}
    members["pics/.DS_Store"] = b"junk"
    members["__MACOSX/pics/._a"] = b"junk"
    archive = tmp_path / "pics.zip"
    archive.write_bytes(zip_of(members))
    out = unpack(archive, "pics.zip", tmp_path / "out", ArchiveLimits())
    assert out.root == tmp_path / "out" / "pics"
    assert out.files == 6 and out.table is None
    assert sorted(p.relative_to(out.root).as_posix() for p in out.root.rglob("*.png")) == [
        f"{c}/{i}.png" for c in "ab" for i in range(3)
    ]
    assert not (tmp_path / "out" / "__MACOSX").exists()


def test_a_zip_of_many_entries_is_refused_before_zipfile_reads_its_directory(
    tmp_path: Path,
) -> None:
    """The end record claims one entry; the directory holds 60,000. ``zipfile`` would
    build ~500 bytes of objects per entry before the first is checked; the walk over
    the directory refuses it while holding next to nothing."""
    import tracemalloc

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(60_000):
            zf.writestr(f"d/{i}", b"")
    data = bytearray(buf.getvalue())
    del buf
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, end + 8, 1, 1)  # entries on this disk, entries in all
    archive = tmp_path / "many.zip"
    archive.write_bytes(bytes(data))
    del data
    tracemalloc.start()
    try:
        with pytest.raises(TooLargeError, match="KILN_MAX_ARCHIVE_FILES"):
            unpack(archive, "many.zip", tmp_path / "out", ArchiveLimits(max_files=1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / (1 << 20):.1f} MiB"


def test_skipped_tar_members_count_against_the_size_limit(tmp_path: Path) -> None:
    """A hidden member is not unpacked, but gzip must still inflate it to pass it."""
    archive = tmp_path / "hidden.tar.gz"
    archive.write_bytes(tar_of([("pics/.padding", bytes(8 << 20)), *folder_members().items()]))
    with pytest.raises(TooLargeError, match="KILN_MAX_DECOMPRESSED_MB"):
        unpack(archive, "hidden.tar.gz", tmp_path / "out", ArchiveLimits(max_bytes=1 << 20))
