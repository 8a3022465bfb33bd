"""Dataset uploads and imports: what is accepted, and that a refusal stores nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from kiln.store.tables import AuditEvent, Dataset

API = "/api/v1"
SMALL = b"x1,x2,label\n1.0,2.0,a\n3.0,4.0,b\n"


def _nothing_stored(platform, before: dict[str, bytes] | None = None) -> None:
    assert platform.count(Dataset) == 0
    assert platform.artifact_files() == (before or {})


def test_upload_registers_an_immutable_copy(platform) -> None:
    data = platform.csv("iris")
    r = platform.upload(platform.admin, data, "iris.csv")
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["name"] == "iris"
    assert out["format"] == "csv"
    assert out["source"] == "upload"
    assert out["rows"] == 150
    assert [c["name"] for c in out["columns"]][-1] == "target"
    assert len(out["columns"]) == 5
    assert out["fingerprint"] == hashlib.sha256(data).hexdigest()
    assert out["size_bytes"] == len(data)
    assert out["ref"] == f"dataset:{out['id']}"
    assert platform.get(f"/datasets/{out['id']}", platform.admin).json() == out
    listed = platform.get("/datasets", platform.admin).json()
    assert listed["items"] == [out]
    assert list(platform.artifact_files().values()) == [data]


def test_upload_takes_an_explicit_name(platform) -> None:
    r = platform.upload(platform.admin, SMALL, "t.csv", name="My_table-2")
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "My_table-2"


def test_anonymous_upload_stores_nothing(platform) -> None:
    r = platform.client.post(f"{API}/datasets", files={"file": ("t.csv", SMALL, "text/csv")})
    assert r.status_code == 401
    _nothing_stored(platform)


@pytest.mark.parametrize(
    "filename",
    [
        "../x.csv",
        "../../../../tmp/x.csv",
        "/etc/passwd.csv",
        "..%2fx.csv",
        "%2e%2e%2fx.csv",
        "%252e%252e%252fx.csv",
        "a\\b.csv",
        "..\\x.csv",
        "a/b.csv",
        ".hidden.csv",
        "x\x00.csv",
        "",
    ],
)
def test_unsafe_filenames_are_refused(platform, filename) -> None:
    r = platform.upload(platform.admin, SMALL, filename)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "file"
    _nothing_stored(platform)


@pytest.mark.parametrize("name", ["a/b", "../up", "..", ".", "x\\y", "%2e%2e", "n" * 129])
def test_unsafe_dataset_names_are_refused(platform, name) -> None:
    r = platform.upload(platform.admin, SMALL, "ok.csv", name=name)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "name"
    _nothing_stored(platform)


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02"


@pytest.mark.parametrize(
    ("filename", "data", "reason"),
    [
        ("image.csv", PNG, "not UTF-8"),
        ("latin1.csv", "name,city\nJosé,Málaga\n".encode("latin-1"), "not UTF-8"),
        ("ragged.csv", b"a,b\n1,2\n1,2,3,4\n", "cannot read ragged.csv as csv"),
        ("header.csv", b"a,b,c\n", "has no rows"),
        ("empty.csv", b"", "empty"),
        ("fake.parquet", b"PAR1 this is not parquet", "cannot read fake.parquet"),
        ("bad.jsonl", b"{nope\n", "cannot read bad.jsonl"),
        ("tool.exe", b"MZ\x90\x00", "cannot tell the format"),
        ("noext", SMALL, "cannot tell the format"),
    ],
)
def test_malformed_uploads_are_refused_with_a_reason(platform, filename, data, reason) -> None:
    r = platform.upload(platform.admin, data, filename)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_data"
    assert error["field"] == "file"
    assert reason in error["message"]
    # the message names the file as sent, not a server-side temporary path
    assert "/tmp" not in error["message"] and "kiln-upload" not in error["message"]
    _nothing_stored(platform)


def test_a_refused_upload_leaves_earlier_datasets_alone(platform) -> None:
    good = platform.upload(platform.admin, SMALL, "good.csv").json()
    before = platform.artifact_files()
    assert platform.upload(platform.admin, b"a,b\n", "good.csv").status_code == 422
    assert platform.upload(platform.admin, SMALL, "../good.csv").status_code == 422
    assert platform.artifact_files() == before
    assert platform.count(Dataset) == 1
    assert platform.get(f"/datasets/{good['id']}", platform.admin).json() == good


@pytest.fixture
def tiny(make_platform):
    """A server that takes uploads of at most 0.01 MiB (10,485 bytes)."""
    return make_platform(max_upload_mb=0.01)


def _multipart_chunks(filename: str, payload: bytes, boundary: str) -> Iterator[bytes]:
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{filename}"\r\nContent-Type: text/csv\r\n\r\n'
    ).encode()
    for i in range(0, len(payload), 1000):
        yield payload[i : i + 1000]
    yield f"\r\n--{boundary}--\r\n".encode()


def test_upload_over_the_limit_is_413_by_content_length(tiny) -> None:
    assert tiny.upload(tiny.admin, SMALL, "small.csv").status_code == 201  # under the limit
    before = tiny.artifact_files()
    big = b"a,b\n" + b"1,2\n" * 5000  # 20 kB
    r = tiny.upload(tiny.admin, big, "big.csv")
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_large"
    assert r.json()["error"]["field"] == "body"
    assert "0.01 MiB" in r.json()["error"]["message"]
    assert tiny.count(Dataset) == 1
    assert tiny.artifact_files() == before


def test_upload_over_the_limit_is_413_without_content_length(tiny) -> None:
    big = b"a,b\n" + b"1,2\n" * 5000

    sent: dict[str, str] = {}
    tiny.client.event_hooks["request"] = [lambda request: sent.update(request.headers)]
    try:
        r = tiny.client.post(
            f"{API}/datasets",
            headers={**tiny.auth(tiny.admin), "Content-Type": "multipart/form-data; boundary=XyZ"},
            content=_multipart_chunks("big.csv", big, "XyZ"),
        )
    finally:
        tiny.client.event_hooks["request"] = []
    assert "content-length" not in sent
    assert sent.get("transfer-encoding") == "chunked"
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_large"
    _nothing_stored(tiny)
    # the same chunked framing under the limit is accepted
    r = tiny.client.post(
        f"{API}/datasets",
        headers={**tiny.auth(tiny.admin), "Content-Type": "multipart/form-data; boundary=XyZ"},
        content=_multipart_chunks("small.csv", SMALL, "XyZ"),
    )
    assert r.status_code == 201, r.text


def test_413s_are_audited(tiny) -> None:
    big = b"a,b\n" + b"1,2\n" * 5000
    assert tiny.upload(tiny.admin, big, "big.csv").status_code == 413
    tiny.client.post(
        f"{API}/datasets",
        headers={**tiny.auth(tiny.admin), "Content-Type": "multipart/form-data; boundary=XyZ"},
        content=_multipart_chunks("big.csv", big, "XyZ"),
    )
    events = tiny.get("/audit", tiny.admin).json()["items"]
    assert tiny.count(AuditEvent) == 2
    for event in events:
        assert event["status"] == 413
        assert event["outcome"] == "too_large"
        assert event["action"] == "datasets.upload"


def test_other_bodies_are_limited_to_8_mib(platform) -> None:
    spec = platform.spec("sklearn:iris")
    spec["padding"] = "x" * (9 << 20)
    r = platform.submit(platform.admin, "train", spec)
    assert r.status_code == 413
    assert "8 MiB" in r.json()["error"]["message"]


# -- import by URI ---------------------------------------------------------------------


@pytest.fixture
def rooted(make_platform, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "iris.csv").write_bytes(SMALL)
    (tmp_path / "secret.csv").write_bytes(b"user,password\nroot,hunter2\n")
    (root / "link.csv").symlink_to(tmp_path / "secret.csv")
    p = make_platform(data_roots=[root])
    p.root = root
    return p


def test_import_from_a_data_root(rooted) -> None:
    r = rooted.post(
        "/datasets/import", rooted.admin, {"name": "iris", "uri": str(rooted.root / "iris.csv")}
    )
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 2
    assert r.json()["source"] == str(rooted.root / "iris.csv")
    assert list(rooted.artifact_files().values()) == [SMALL]


@pytest.mark.parametrize(
    "uri",
    [
        "{root}/../secret.csv",
        "{root}/link.csv",
        "file://{root}/../secret.csv",
        "/etc/passwd",
        "file:///etc/passwd",
        "secret.csv",
    ],
)
def test_import_outside_the_data_roots_is_refused(rooted, uri) -> None:
    r = rooted.post(
        "/datasets/import", rooted.admin, {"name": "x", "uri": uri.format(root=rooted.root)}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "uri"
    assert "hunter2" not in r.text
    _nothing_stored(rooted)


def test_import_with_unsafe_name_is_refused(rooted) -> None:
    r = rooted.post(
        "/datasets/import", rooted.admin, {"name": "../x", "uri": str(rooted.root / "iris.csv")}
    )
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "name"
    _nothing_stored(rooted)


def test_import_without_data_roots_refuses_paths(platform, tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(SMALL)
    r = platform.post("/datasets/import", platform.admin, {"name": "t", "uri": str(path)})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "uri"
    _nothing_stored(platform)


def test_an_import_over_the_upload_limit_is_refused_while_copied(make_platform, tmp_path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    big = root / "big.csv"
    big.write_bytes(b"a,b\n" + b"1,2\n" * 300_000)  # 1.2 MB, over a 1 MB limit
    p = make_platform(data_roots=[root], max_upload_mb=1)
    r = p.post("/datasets/import", p.admin, {"name": "big", "uri": str(big)})
    assert r.status_code == 413, r.text
    assert "KILN_MAX_UPLOAD_MB" in r.json()["error"]["message"]
    _nothing_stored(p)
