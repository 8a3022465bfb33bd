"""Encryption at rest (kiln.store.crypto): real SQLite databases and local stores.

Every check reads the bytes that really lie on disk, and every tampering is done to
those files, the way an attacker with access to the artifact folder would.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import struct
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from kiln.errors import ConflictError, EncryptionError, NotFoundError, SpecError
from kiln.settings import Settings
from kiln.store.crypto import (
    HEADER,
    SEGMENT,
    EncryptedStore,
    open_artifacts,
    rotate_master_key,
)
from kiln.store.db import Database, migrate
from kiln.store.projects import ensure_project
from kiln.store.tables import DataKey

MARKER = b"ZEBRA-MARKER-7f3a"


@dataclass
class Kiln:
    settings: Settings
    db: Database
    store: EncryptedStore

    @property
    def root(self) -> Path:
        return Path(self.settings.resolved_artifacts)

    def raw(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def reopen(self, **overrides: object) -> EncryptedStore:
        """The store as a restarted process opens it (fresh database, fresh caches)."""
        settings = self.settings.model_copy(update=overrides)
        return open_artifacts(settings, Database(settings.resolved_database_url))


@pytest.fixture
def kiln_home(tmp_path: Path) -> Iterator[Kiln]:
    settings = Settings(home=tmp_path / "home")
    migrate(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    store = open_artifacts(settings, db)
    with db.session() as s:
        ensure_project(s, "alpha")
        ensure_project(s, "beta")
    yield Kiln(settings, db, store)
    db.dispose()


def _key_id(raw: bytes) -> int:
    return int(HEADER.unpack(raw[: HEADER.size])[3])


def test_the_key_file_is_created_once_with_mode_0600(kiln_home: Kiln) -> None:
    path = kiln_home.settings.home_dir / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text().strip())) == 32
    before = path.read_text()
    kiln_home.reopen()
    assert path.read_text() == before  # a restart reuses it


@pytest.mark.parametrize(
    "size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT, 3 * SEGMENT + 17]
)
def test_bytes_and_files_round_trip_and_only_ciphertext_is_stored(
    kiln_home: Kiln, tmp_path: Path, size: int
) -> None:
    data = (MARKER * (size // len(MARKER) + 1))[:size]
    store = kiln_home.store
    store.put_bytes("projects/alpha/b/blob", data)
    assert store.get_bytes("projects/alpha/b/blob") == data
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    store.put_file("projects/alpha/f/file.bin", src)
    store.get_file("projects/alpha/f/file.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    for key in ("projects/alpha/b/blob", "projects/alpha/f/file.bin"):
        raw = kiln_home.raw(key)
        assert raw.startswith(b"KILNENC") and MARKER not in raw
        segments = max(1, -(-size // SEGMENT))
        assert len(raw) == HEADER.size + size + 28 * segments
        assert store.size(key) == len(raw)  # stored bytes


def test_directories_round_trip_and_projects_have_their_own_keys(
    kiln_home: Kiln, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "tokenizer").mkdir(parents=True)
    (bundle / "kiln.json").write_bytes(b'{"name": "' + MARKER + b'"}')
    (bundle / "tokenizer" / "vocab.txt").write_bytes(MARKER * 1000)
    store = kiln_home.store
    for project in ("alpha", "beta"):
        keys = store.put_dir(f"projects/{project}/models/m/v1", bundle)
        assert sorted(keys) == sorted(store.list(f"projects/{project}/models/m/v1"))
    store.get_dir("projects/beta/models/m/v1", tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer" / "vocab.txt").read_bytes() == MARKER * 1000
    for path in kiln_home.root.rglob("*"):
        if path.is_file():
            assert MARKER not in path.read_bytes(), path
    alpha = _key_id(kiln_home.raw("projects/alpha/models/m/v1/kiln.json"))
    beta = _key_id(kiln_home.raw("projects/beta/models/m/v1/kiln.json"))
    outside = kiln_home.store.put_bytes("base-models/m/config.json", b"{}")
    platform = _key_id(kiln_home.raw("base-models/m/config.json"))
    assert outside is None and len({alpha, beta, platform}) == 3
    with kiln_home.db.session() as s:
        rows = {r.id: r.project_id for r in s.scalars(select(DataKey))}
    assert rows[platform] is None and rows[alpha] != rows[beta]


def test_checkpoints_are_ciphertext(kiln_home: Kiln) -> None:
    import torch

    from kiln.jobs.checkpoints import ArtifactCheckpoints

    weight = torch.arange(4096, dtype=torch.float32) * 1.2345
    checkpoints = ArtifactCheckpoints(kiln_home.store, "projects/alpha/jobs/j1/checkpoint.pt")
    checkpoints.save({"model": {"w": weight}, "epoch": 3})
    raw = kiln_home.raw("projects/alpha/jobs/j1/checkpoint.pt")
    assert weight.numpy().tobytes()[:64] not in raw
    loaded = checkpoints.load()
    assert loaded is not None and torch.equal(loaded["model"]["w"], weight)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _segments(raw: bytes) -> list[bytes]:
    body, record = raw[HEADER.size :], 12 + SEGMENT + 16
    return [body[i : i + record] for i in range(0, len(body), record)]


def test_tampered_truncated_reordered_or_moved_ciphertext_is_refused(
    kiln_home: Kiln, tmp_path: Path
) -> None:
    data = os.urandom(3 * SEGMENT + 100)
    store = kiln_home.store
    key = "projects/alpha/datasets/d1/table.bin"
    store.put_bytes(key, data)
    path = kiln_home.root / key
    good = path.read_bytes()

    def refused(expect: str = "integrity check") -> None:
        with pytest.raises(EncryptionError, match=expect) as err:
            store.get_bytes(key)
        assert err.value.http_status == 500 and err.value.field == "key"
        out = tmp_path / "out.bin"
        with pytest.raises(EncryptionError):
            store.get_file(key, out)
        assert not out.exists()  # no partial plaintext is left behind
        path.write_bytes(good)

    for offset in (HEADER.size + 40, len(good) // 2, len(good) - 1):  # body, middle, last tag
        _flip(path, offset)
        refused()
    segs = _segments(good)
    path.write_bytes(good[: HEADER.size] + b"".join(segs[:-1]))  # the last segment dropped
    refused()
    path.write_bytes(good[: HEADER.size] + segs[1] + segs[0] + b"".join(segs[2:]))
    refused()
    path.write_bytes(good[:10])  # cut inside the header
    refused()
    # the header's segment size is bound too
    path.write_bytes(good[:8] + struct.pack(">I", SEGMENT // 2) + good[12:])
    refused()
    # ciphertext copied over another object's name, in the same or another project
    for other in ("projects/alpha/datasets/d2/table.bin", "projects/beta/datasets/d1/table.bin"):
        (kiln_home.root / other).parent.mkdir(parents=True)
        shutil.copy(path, kiln_home.root / other)
        with pytest.raises(EncryptionError, match="integrity check"):
            store.get_bytes(other)
    assert store.get_bytes(key) == data


def test_plaintext_objects_are_refused_unless_allowed_and_can_be_encrypted(
    kiln_home: Kiln,
) -> None:
    legacy = kiln_home.root / "projects" / "alpha" / "datasets" / "old" / "t.csv"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"a,b\n" + MARKER + b",1\n")
    key = "projects/alpha/datasets/old/t.csv"
    with pytest.raises(EncryptionError, match="KILN_ALLOW_PLAINTEXT_ARTIFACTS"):
        kiln_home.store.get_bytes(key)
    assert kiln_home.reopen(allow_plaintext_artifacts=True).get_bytes(key).endswith(b",1\n")
    kiln_home.store.put_bytes("projects/alpha/new", b"x")
    assert kiln_home.store.encrypt_existing() == 1
    assert MARKER not in legacy.read_bytes()
    assert kiln_home.store.get_bytes(key) == b"a,b\n" + MARKER + b",1\n"
    assert kiln_home.store.encrypt_existing() == 0


def test_restart_reads_back_and_a_wrong_or_missing_key_fails_at_start(kiln_home: Kiln) -> None:
    kiln_home.store.put_bytes("projects/alpha/x", MARKER)
    assert kiln_home.reopen().get_bytes("projects/alpha/x") == MARKER
    other = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(EncryptionError, match="KILN_MASTER_KEY") as err:
        kiln_home.reopen(master_key=SecretStr(other))
    assert err.value.field == "KILN_MASTER_KEY"
    with pytest.raises(EncryptionError, match="base64 of 32"):
        kiln_home.reopen(master_key=SecretStr("not-a-key"))
    key_file = kiln_home.settings.home_dir / "master.key"
    saved = key_file.read_text()
    key_file.unlink()
    with pytest.raises(EncryptionError, match="no master key") as err:
        kiln_home.reopen()
    assert str(key_file) in err.value.message
    assert not key_file.exists()  # never replaced by a new key over existing data keys
    # KILN_MASTER_KEY holding the key file's content works in its stead
    assert kiln_home.reopen(master_key=SecretStr(saved.strip())).get_bytes("projects/alpha/x")


def test_a_project_made_after_start_gets_its_key_in_the_same_transaction(
    kiln_home: Kiln,
) -> None:
    with kiln_home.db.session() as s:
        project = ensure_project(s, "gamma")
        s.flush()
        row = s.scalar(select(DataKey).where(DataKey.project_id == project.id))
        assert row is not None  # visible inside the transaction that made the project
    kiln_home.store.put_bytes("projects/gamma/x", MARKER)
    assert _key_id(kiln_home.raw("projects/gamma/x")) == row.id
    assert kiln_home.reopen().get_bytes("projects/gamma/x") == MARKER


def test_two_stores_on_one_database_make_one_key_per_project(kiln_home: Kiln) -> None:
    second = open_artifacts(kiln_home.settings, kiln_home.db)  # e.g. a Worker given only db
    with kiln_home.db.session() as s:
        project = ensure_project(s, "delta")
    with kiln_home.db.session() as s:
        rows = list(s.scalars(select(DataKey).where(DataKey.project_id == project.id)))
    assert len(rows) == 1
    second.put_bytes("projects/delta/x", MARKER)
    assert kiln_home.store.get_bytes("projects/delta/x") == MARKER


def test_rotate_master_rewraps_keys_and_the_old_key_stops_working(kiln_home: Kiln) -> None:
    store = kiln_home.store
    store.put_bytes("projects/alpha/x", MARKER)
    before = {p: p.read_bytes() for p in kiln_home.root.rglob("*") if p.is_file()}
    key_file = kiln_home.settings.home_dir / "master.key"
    old = key_file.read_text().strip()
    done = rotate_master_key(kiln_home.settings)
    assert done.rewrapped == 3 and done.key_file == key_file  # platform, alpha, beta
    assert key_file.read_text().strip() == done.new_key.encoded() != old
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not key_file.with_name("master.key.new").exists()
    # the data was not re-encrypted, and reads with the new key only
    assert {p: p.read_bytes() for p in kiln_home.root.rglob("*") if p.is_file()} == before
    assert kiln_home.reopen().get_bytes("projects/alpha/x") == MARKER
    with pytest.raises(EncryptionError, match="not the one that wrapped"):
        kiln_home.reopen(master_key=SecretStr(old))
    # a process still holding the old key refuses to make projects with it
    with pytest.raises(EncryptionError, match="rotated"), kiln_home.db.session() as s:
        ensure_project(s, "late")


def test_rotate_master_for_env_key_users(kiln_home: Kiln, tmp_path: Path) -> None:
    kiln_home.store.put_bytes("projects/alpha/x", MARKER)
    current = (kiln_home.settings.home_dir / "master.key").read_text().strip()
    env = kiln_home.settings.model_copy(update={"master_key": SecretStr(current)})
    shown: list[str] = []
    done = rotate_master_key(env, before_commit=lambda k: shown.append(k.encoded()))
    assert shown == [done.new_key.encoded()] and done.key_file is None
    assert kiln_home.reopen(master_key=SecretStr(shown[0])).get_bytes("projects/alpha/x")
    with pytest.raises(EncryptionError):
        kiln_home.reopen()  # the key file holds the old key now
    target = tmp_path / "new.key"
    env = env.model_copy(update={"master_key": SecretStr(shown[0])})
    done = rotate_master_key(env, new_key_file=target)
    assert target.read_text().strip() == done.new_key.encoded()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    newest = SecretStr(done.new_key.encoded())
    with pytest.raises(ConflictError):  # never overwrites a file
        rotate_master_key(env.model_copy(update={"master_key": newest}), new_key_file=target)
    with pytest.raises(SpecError):  # a new key nobody would see is refused
        rotate_master_key(env.model_copy(update={"master_key": newest}))
    with pytest.raises(EncryptionError):  # env still holds the replaced key: nothing written
        rotate_master_key(env, new_key_file=tmp_path / "unused.key")
    assert not (tmp_path / "unused.key").exists()
    assert kiln_home.reopen(master_key=newest).get_bytes("projects/alpha/x") == MARKER


def test_rotate_master_needs_a_platform(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "fresh")
    migrate(settings.resolved_database_url)
    settings.home_dir.joinpath("master.key").write_text(base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(NotFoundError, match="kiln up"):
        rotate_master_key(settings)


def test_large_files_stream_in_bounded_memory(kiln_home: Kiln, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    with src.open("wb") as fh:
        for _ in range(24):
            fh.write(os.urandom(SEGMENT))
    tracemalloc.start()
    try:
        kiln_home.store.put_file("projects/alpha/big.bin", src)
        kiln_home.store.get_file("projects/alpha/big.bin", tmp_path / "back.bin")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * SEGMENT, peak  # a 24 MiB file, a few segments in memory at most
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_s3_server_side_encryption_is_requested(s3_bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from servers import s3_client

    settings = Settings(
        home=tmp_path / "home",
        artifacts=s3_bucket.url,
        s3_endpoint_url=s3_bucket.endpoint_url,
        s3_sse="AES256",
    )
    migrate(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    try:
        store = open_artifacts(settings, db)
        src = tmp_path / "t.csv"
        src.write_bytes(MARKER)
        store.put_file("base-models/m/t.csv", src)
        store.put_bytes("base-models/m/b", MARKER)
        bucket, _, prefix = s3_bucket.url.removeprefix("s3://").partition("/")
        client = s3_client(s3_bucket.endpoint_url)
        for name in ("t.csv", "b"):
            head = client.head_object(Bucket=bucket, Key=f"{prefix}/base-models/m/{name}")
            assert head["ServerSideEncryption"] == "AES256"
            body = client.get_object(Bucket=bucket, Key=f"{prefix}/base-models/m/{name}")
            assert MARKER not in body["Body"].read()
        assert store.get_bytes("base-models/m/b") == MARKER
    finally:
        db.dispose()
