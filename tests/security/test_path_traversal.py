"""Path traversal in every name and path field of the API: refused, nothing escapes.

Each payload (``../``, URL-encoded and double-encoded dots and slashes, absolute paths,
a NUL byte raw and encoded, backslashes, bare ``..``) goes into every field that names
something kiln stores or reads: the upload's file name and dataset name, an import URI,
a job's data source and model name, an alias, a project, a deployment, a base model, a
key name, and the path segments of the bundle download and of every id route. Each answer is a 4xx
(never a 5xx, never a file's bytes), nothing is registered under such a name, and no
file whose name carries the payload's marker appears outside kiln's artifact store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from security_routes import RouteSpec, call, route_table

MARK = "kilnescape"
PAYLOADS = [
    f"../{MARK}",
    f"../../../../../../tmp/{MARK}",
    f"..%2f..%2f{MARK}",
    f"%2e%2e%2f%2e%2e%2f{MARK}",
    f"%252e%252e%252f{MARK}",  # double-encoded
    f"/tmp/{MARK}",
    "/etc/passwd",
    f"a\x00b{MARK}",
    f"a%00b{MARK}",
    f"..\\..\\{MARK}",
    f"sub\\..\\..\\{MARK}",
    "..",
    ".",
    f"~/{MARK}",
    f"C:\\{MARK}",
    f"file:///tmp/{MARK}",
]
IDS = [repr(p) for p in PAYLOADS]
PASSWD = "root:x:0:0"  # what /etc/passwd starts with: never in an answer


def _encoded(payload: str) -> list[str]:
    """``payload`` as URL path segments: percent-encoded (dots too, which a client would
    otherwise resolve as dot segments before sending), and that encoded again; the raw
    form as well where a client can send it (printable, not just dots)."""
    once = "".join(f"%{b:02X}" for b in payload.encode())
    forms = [once, quote(once, safe="")]
    if payload.isprintable() and payload.strip(".") and "/" not in payload:
        forms.append(payload)
    return forms


def _refused(r: Any) -> None:
    # a 429 would refuse for another reason than the payload: the world's limits are off
    assert 400 <= r.status_code < 500 and r.status_code != 429, (r.status_code, r.text[:300])
    assert PASSWD not in r.text


def _no_escape(served: Any) -> None:
    """No file named after the marker exists outside the artifact store, and every key
    in the store is made of safe segments."""
    home = Path(served.settings.home_dir)
    store = Path(served.settings.resolved_artifacts)
    roots = [home.parent, Path("/tmp"), Path("/"), Path("/etc"), Path.home()]
    found = [p for root in roots for p in root.glob(f"*{MARK}*")]
    found += [p for p in home.parent.rglob(f"*{MARK}*") if not p.is_relative_to(store)]
    assert found == [], found
    for key in served.svc.store.list(""):
        assert ".." not in key.split("/") and "\\" not in key and "\x00" not in key, key


@pytest.mark.parametrize("payload", PAYLOADS, ids=IDS)
def test_dataset_upload_filename_and_name(served: Any, payload: str) -> None:
    key = served.keys["alpha_train"]
    before = len(served.get("/datasets", key, limit=500).json()["items"])
    created = 0
    for filename in (payload, f"{payload}.csv"):
        r = served.upload(key, served.csv("iris"), filename=filename)
        if r.status_code == 201 and payload.startswith("C:\\"):
            # the multipart parser keeps only the base name of a Windows path (an IE6
            # habit): the server never sees the drive, and stores a plain name
            assert r.json()["name"] == MARK, r.text
            created += 1
            continue
        _refused(r)
    _refused(served.upload(key, served.csv("iris"), filename="iris.csv", name=payload))
    after = served.get("/datasets", key, limit=500).json()["items"]
    assert len(after) == before + created
    _no_escape(served)


@pytest.mark.parametrize("payload", PAYLOADS, ids=IDS)
def test_job_data_source_and_model_name(served: Any, payload: str) -> None:
    key = served.keys["alpha_train"]
    _refused(served.submit(key, "train", served.spec(payload)))
    _refused(served.submit(key, "train", served.spec(served.refs["alpha"], name=payload)))
    evaluate = {"model": payload, "version": 1, "data": served.refs["alpha"]}
    _refused(served.submit(key, "evaluate", evaluate))
    _refused(served.submit(key, "compress", {"source": f"model:{payload}", "steps": []}))
    _no_escape(served)


@pytest.mark.parametrize("payload", PAYLOADS, ids=IDS)
def test_project_deployment_alias_and_key_names(served: Any, payload: str) -> None:
    _refused(served.post("/projects", served.admin, {"name": payload}))
    deploy = served.keys["alpha_deploy"]
    body = {"name": payload, "model": "iris", "version": 1}
    _refused(served.post("/deployments", deploy, body))
    _refused(served.post("/deployments", deploy, {**body, "name": "ok", "model": payload}))
    for alias in _encoded(payload):
        _refused(served.put(f"/models/iris/aliases/{alias}", deploy, {"version": 1}))
    source = "pkg:no-such-package/nothing"  # copied from nowhere, whatever the name does
    _refused(served.post("/base-models", served.admin, {"name": payload, "source": source}))
    # a key's name is a label, not a path: it may be accepted, as it was written
    r = served.post(
        "/keys", served.admin, {"project": "alpha", "scopes": ["read"], "name": payload}
    )
    assert r.status_code in (201, 422), r.text
    if r.status_code == 201:
        assert r.json()["name"] == payload
        assert served.delete(f"/keys/{r.json()['id']}", served.admin).status_code == 200
    names = [p["name"] for p in served.get("/projects", served.admin).json()]
    assert all(MARK not in n and ".." not in n for n in names), names
    assert served.get("/deployments", deploy).json() == [] or all(
        MARK not in d["name"] for d in served.get("/deployments", deploy).json()
    )
    aliases = served.get("/models/iris", deploy).json()["aliases"]
    assert all(MARK not in a and ".." not in a for a in aliases), aliases
    _no_escape(served)


@pytest.mark.parametrize("payload", PAYLOADS, ids=IDS)
def test_bundle_download_path_segments(served: Any, payload: str) -> None:
    key = served.keys["alpha_read"]
    for segment in _encoded(payload):
        for path in (
            f"/models/{segment}/versions/1/bundle",
            f"/models/iris/versions/{segment}/bundle",
        ):
            r = served.client.get("/api/v1" + path, headers=served.auth(key))
            _refused(r)


def _id_routes() -> list[RouteSpec]:
    """Every route with a path parameter, whatever its method (a body it lacks may make
    the answer a 422: still refused, and the lookup never ran)."""
    return [r for r in route_table() if r.params]


@pytest.mark.parametrize("route", _id_routes(), ids=str)
def test_every_id_route_refuses_traversal(served: Any, route: RouteSpec) -> None:
    key = served.keys["alpha_admin"] if route.scope != "admin" else served.admin
    for payload in PAYLOADS:
        for segment in _encoded(payload):
            values = dict.fromkeys(route.params, segment)
            r = call(served.client, route, key, **values)
            _refused(r)


@pytest.fixture
def rooted(make_platform: Any, tmp_path: Path) -> tuple[Any, Path, Path]:
    """A server allowed to import from one data root; a secret table sits beside it, and
    a symlink inside the root points at the secret."""
    root = tmp_path / "roots" / "data"
    root.mkdir(parents=True)
    (root / "ok.csv").write_text("a,b\n1,2\n3,4\n")
    secret = tmp_path / "roots" / "secret.csv"
    secret.write_text("token,value\nSECRET-kiln-0042,1\nSECRET-kiln-0043,2\n")
    (root / "link.csv").symlink_to(secret)
    (root / "linkdir").symlink_to(secret.parent)
    return make_platform(data_roots=[root]), root, secret


def test_import_uri_stays_inside_the_data_roots(rooted: tuple[Any, Path, Path]) -> None:
    platform, root, secret = rooted
    key = platform.admin
    r = platform.post("/datasets/import", key, {"name": "ok", "uri": str(root / "ok.csv")})
    assert r.status_code == 201, r.text  # the root itself works
    uris = [
        f"{root}/../secret.csv",
        f"file://{root}/../secret.csv",
        f"{root}/%2e%2e/secret.csv",
        f"{root}/..%2fsecret.csv",
        f"{root}/link.csv",
        f"{root}/linkdir/secret.csv",
        str(secret),
        f"file://{secret}",
        "/etc/passwd",
        "file:///etc/passwd",
        f"{root}/ok.csv\x00.parquet",
        f"{root}\\..\\secret.csv",
        f"~/../../{secret}",
    ]
    for i, uri in enumerate(uris):
        r = platform.post("/datasets/import", key, {"name": f"probe{i}", "uri": uri})
        _refused(r)
        assert "SECRET-kiln" not in r.text
    listed = platform.get("/datasets", key).json()["items"]
    assert [d["name"] for d in listed] == ["ok"]
    stored = b"".join(platform.artifact_files().values())
    assert b"SECRET-kiln" not in stored
    assert set(os.listdir(secret.parent)) == {"data", "secret.csv"}
