"""The artifact store contract, run against a local directory and a real S3 server (moto)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kiln.errors import DataError, NotFoundError
from kiln.store.artifacts import ArtifactStore, FsspecStore, open_store, safe_key, safe_segment
from servers import S3Bucket, s3_client

BACKENDS = ["local", "s3"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return open_store(str(tmp_path / "artifacts"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(bucket.url, endpoint_url=bucket.endpoint_url)


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "kiln.json": b'{"format": 1}',
        "weights.safetensors": os.urandom(3000),
        "empty.txt": b"",
        "tokenizer/vocab.txt": b"[UNK]\nhello\n",
        "tokenizer/deep/er/config.json": b"{}",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


# --- names -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "model-1.v2_final", "x" * 128, "7", "_x", "-x", "a..b"])
def test_safe_segment_accepts(name: str) -> None:
    assert safe_segment(name, field="name") == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "a/b", "a\\b", "../x", "/etc", "%2e%2e", "..%2f", "%252e%252e",
     "a\x00b", "a\nb", "a b", "x" * 129, "é", "C:x"],
)  # fmt: skip
def test_safe_segment_rejects(name: str) -> None:
    with pytest.raises(DataError) as info:
        safe_segment(name, field="dataset")
    assert info.value.field == "dataset"


def test_safe_key() -> None:
    assert safe_key("models", "7", "kiln.json") == "models/7/kiln.json"
    for bad in [("a/b",), (), ("a", ".."), ("a", "")]:
        with pytest.raises(DataError) as info:
            safe_key(*bad)
        assert info.value.field == "key"


BAD_KEYS = [
    "../x", "/etc/passwd", "a/../../b", "%2e%2e/x", "..%2fx", "a\\b", "", "..", ".", "a//b",
    "a/", "a/./b", "%252e%252e/x", "a\x00b", "~/x", "a/.tmp-x",
]  # fmt: skip

CALLS: dict[str, Callable[[ArtifactStore, str, Path], Any]] = {
    "put_bytes": lambda s, k, p: s.put_bytes(k, b"x"),
    "get_bytes": lambda s, k, p: s.get_bytes(k),
    "put_file": lambda s, k, p: s.put_file(k, p / "src" / "kiln.json"),
    "get_file": lambda s, k, p: s.get_file(k, p / "out.bin"),
    "put_dir": lambda s, k, p: s.put_dir(k, p / "src"),
    "get_dir": lambda s, k, p: s.get_dir(k, p / "out"),
    "exists": lambda s, k, p: s.exists(k),
    "size": lambda s, k, p: s.size(k),
    "total_size": lambda s, k, p: s.total_size(k),
    "list": lambda s, k, p: s.list(k),
    "delete": lambda s, k, p: s.delete(k),
}
ROOT_OK = {"list", "total_size"}  # "" names the whole store for these two


@pytest.fixture(scope="module", params=BACKENDS)
def shared_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> ArtifactStore:
    """One store per backend for the whole key matrix: hundreds of cases, one bucket."""
    if request.param == "local":
        store = open_store(str(tmp_path_factory.mktemp("shared") / "artifacts"))
    else:
        endpoint = request.getfixturevalue("s3_server")
        bucket = f"kiln-keys-{uuid.uuid4().hex[:12]}"
        s3_client(endpoint).create_bucket(Bucket=bucket)
        store = open_store(f"s3://{bucket}/artifacts", endpoint_url=endpoint)
    store.put_bytes("keep/me", b"safe")
    return store


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize("key", BAD_KEYS)
def test_every_method_rejects_bad_keys(
    shared_store: ArtifactStore, tmp_path: Path, method: str, key: str
) -> None:
    make_tree(tmp_path / "src")
    if key == "" and method in ROOT_OK:
        CALLS[method](shared_store, key, tmp_path)
        return
    with pytest.raises(DataError) as info:
        CALLS[method](shared_store, key, tmp_path)
    assert info.value.field == "key"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.bin").exists()


def test_bad_keys_left_the_store_alone(shared_store: ArtifactStore) -> None:
    assert shared_store.list("") == ["keep/me"]  # nothing written, nothing deleted


# --- the contract, on both backends ------------------------------------------------------


def test_bytes_round_trip(store: ArtifactStore) -> None:
    store.put_bytes("models/1/kiln.json", b"one")
    assert store.get_bytes("models/1/kiln.json") == b"one"
    store.put_bytes("models/1/kiln.json", b"second")  # overwrite
    assert store.get_bytes("models/1/kiln.json") == b"second"
    assert store.exists("models/1/kiln.json")
    assert store.size("models/1/kiln.json") == 6
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b"" and store.size("empty") == 0


def test_file_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(100_000))
    store.put_file("datasets/d1/w.bin", src)
    out = tmp_path / "new" / "nested" / "w.bin"
    store.get_file("datasets/d1/w.bin", out)
    assert out.read_bytes() == src.read_bytes()
    store.get_file("datasets/d1/w.bin", str(out))  # overwrite, str path
    assert out.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["w.bin"]  # no temp files


def test_dir_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "bundle")
    keys = store.put_dir("models/m1/v1", tmp_path / "bundle")
    assert keys == sorted(f"models/m1/v1/{rel}" for rel in files)
    assert store.list("models/m1/v1") == keys
    assert store.list("models") == keys
    assert store.total_size("models/m1") == sum(len(d) for d in files.values())
    store.get_dir("models/m1/v1", tmp_path / "copy")
    got = {
        p.relative_to(tmp_path / "copy").as_posix(): p.read_bytes()
        for p in (tmp_path / "copy").rglob("*")
        if p.is_file()
    }
    assert got == files
    store.get_dir("models/m1/v1/tokenizer", tmp_path / "tok")
    assert (tmp_path / "tok" / "deep" / "er" / "config.json").read_bytes() == b"{}"


def test_put_empty_dir(store: ArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    assert store.put_dir("x", tmp_path / "nothing") == []
    with pytest.raises(NotFoundError):
        store.get_dir("x", tmp_path / "out")


def test_list_total_size_delete(store: ArtifactStore) -> None:
    for key in ["a/x", "a/y/z", "ab/x", "b"]:
        store.put_bytes(key, b"12345")
    assert store.list("a") == ["a/x", "a/y/z"]  # not "ab/x": prefixes end at a "/"
    assert store.list("") == ["a/x", "a/y/z", "ab/x", "b"]
    assert store.list("b") == []  # a key has nothing below it
    assert store.list("nope") == [] and store.total_size("nope") == 0
    assert store.total_size("a") == 10 and store.total_size("") == 20
    assert not store.exists("a")  # a prefix is not an artifact
    store.delete("a")
    assert store.list("") == ["ab/x", "b"]
    assert not store.exists("a/x")
    store.delete("b")
    assert not store.exists("b") and store.list("") == ["ab/x"]
    store.delete("b")  # missing is fine
    store.delete("never/was")


def test_missing(store: ArtifactStore, tmp_path: Path) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: store.get_bytes("no/such"),
        lambda: store.get_file("no/such", tmp_path / "out" / "f"),
        lambda: store.get_dir("no", tmp_path / "out"),
        lambda: store.size("no/such"),
        lambda: store.put_file("k", tmp_path / "missing.bin"),
        lambda: store.put_dir("k", tmp_path / "missing"),
    ]
    for call in calls:
        with pytest.raises(NotFoundError):
            call()
    assert not store.exists("no/such")
    assert not (tmp_path / "out").exists()
    store.put_bytes("d/f", b"1")
    with pytest.raises(NotFoundError):
        store.get_bytes("d")  # a prefix, not an artifact
    with pytest.raises(NotFoundError):
        store.size("d")


def test_put_dir_validates_names_before_writing(store: ArtifactStore, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    (tmp_path / "src" / "tokenizer" / "bad name.txt").write_text("x")
    with pytest.raises(DataError):
        store.put_dir("m", tmp_path / "src")
    assert store.list("") == []


def test_put_dir_refuses_symlinks_out(store: ArtifactStore, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    (tmp_path / "secret").write_text("s3cr3t")
    (tmp_path / "src" / "inside").symlink_to(tmp_path / "src" / "kiln.json")
    assert "m/inside" in store.put_dir("m", tmp_path / "src")  # a link within is content
    (tmp_path / "src" / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(DataError):
        store.put_dir("m2", tmp_path / "src")
    assert store.list("m2") == []


def test_s3_sees_other_writers_at_once(s3_bucket: S3Bucket) -> None:
    store = open_store(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url)
    other = s3_client(s3_bucket.endpoint_url)
    assert not store.exists("k") and store.list("") == []
    other.put_object(Bucket=s3_bucket.name, Key="artifacts/k", Body=b"v")
    assert store.exists("k") and store.list("") == ["k"] and store.get_bytes("k") == b"v"
    other.delete_object(Bucket=s3_bucket.name, Key="artifacts/k")
    assert not store.exists("k") and store.list("") == []


def test_s3_endpoints_are_not_shared(s3_bucket: S3Bucket) -> None:
    good = open_store(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url)
    bad = open_store(s3_bucket.url, endpoint_url="http://127.0.0.1:9")  # nothing listens
    assert isinstance(good, FsspecStore) and isinstance(bad, FsspecStore)
    again = open_store(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url)
    assert isinstance(again, FsspecStore)
    assert good.fs is not bad.fs and good.fs is again.fs  # one client per endpoint


# --- local only --------------------------------------------------------------------------


def test_local_root_created_on_first_write(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "artifacts"
    store = open_store(f"file://{root}")
    assert store.url == str(root)
    assert store.list("") == [] and not root.exists()
    store.put_bytes("a", b"1")
    assert (root / "a").read_bytes() == b"1"


def test_local_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(str(tmp_path / "s"))
    store.put_bytes("m/f", b"old")
    (tmp_path / "src").write_bytes(b"new")

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    for write in (
        lambda: store.put_bytes("m/f", b"new"),
        lambda: store.put_file("m/f", tmp_path / "src"),
    ):
        with pytest.raises(OSError, match="disk gone"):
            write()
    monkeypatch.undo()
    assert store.get_bytes("m/f") == b"old"
    assert os.listdir(tmp_path / "s" / "m") == ["f"]  # no temp file left behind


def test_local_key_clashing_with_prefix(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    store.put_bytes("a/b", b"1")
    with pytest.raises(DataError):
        store.put_bytes("a", b"2")
    store.put_bytes("c", b"1")
    with pytest.raises(DataError):
        store.put_bytes("c/d", b"2")


def test_local_symlinks_cannot_escape(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s3cr3t")
    root = tmp_path / "s"
    store = open_store(str(root))
    store.put_bytes("models/ok", b"1")
    (root / "models" / "evil").symlink_to(outside / "secret")
    (root / "linkdir").symlink_to(outside)
    for key in ["models/evil", "linkdir/secret"]:
        for call in (store.get_bytes, store.exists, store.size, store.delete):
            with pytest.raises(DataError):
                call(key)
        with pytest.raises(DataError):
            store.get_file(key, tmp_path / "got")
    with pytest.raises(DataError):
        store.put_bytes("linkdir/new", b"x")
    with pytest.raises(DataError):
        store.get_dir("linkdir", tmp_path / "got")
    assert store.list("") == ["models/ok"]
    assert store.total_size("") == 1
    assert sorted(os.listdir(outside)) == ["secret"] and not (tmp_path / "got").exists()


def test_local_root_behind_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    store = open_store(str(tmp_path / "alias"))
    store.put_bytes("a/b", b"1")
    assert store.get_bytes("a/b") == b"1" and store.list("") == ["a/b"]


# --- opening -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://x/y", "memory://x", "s3://", "s3://Bad_Bucket/x", "s3://bucket/../x", "s3://b/%2e%2e"],
)
def test_open_store_rejects(url: str) -> None:
    with pytest.raises(DataError) as info:
        open_store(url)
    assert info.value.field == "artifacts"


def test_s3_store_at_bucket_root(s3_bucket: S3Bucket) -> None:
    store = open_store(f"s3://{s3_bucket.name}/", endpoint_url=s3_bucket.endpoint_url)
    assert store.url == f"s3://{s3_bucket.name}"
    store.put_bytes("a/b", b"1")
    assert store.list("") == ["a/b"] and store.list("a") == ["a/b"]
    nested = open_store(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url)
    nested.put_bytes("x", b"2")
    assert nested.list("") == ["x"]
    assert store.list("") == ["a/b", "artifacts/x"]
