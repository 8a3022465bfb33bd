"""A restart on the same KILN_HOME loses nothing and mints no second admin key."""

from __future__ import annotations

import io
import stat
import tarfile

from fastapi.testclient import TestClient

from kiln.app import build_services, create_app
from kiln.server import bootstrap
from kiln.settings import Settings

API = "/api/v1"


def _contents(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def test_everything_survives_a_restart(make_platform) -> None:
    first = make_platform()
    settings = first.settings
    key_file = settings.admin_key_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().strip() == first.admin

    first.create_project("team")
    team = first.create_key("team", ["read", "train", "deploy"])
    ref = first.dataset(team, "iris")
    done = first.queued(team, "train", first.spec(ref))
    first.run_jobs()
    assert first.put("/models/iris/aliases/prod", team, {"version": 1}).status_code == 200
    waiting = first.queued(team, "train", first.spec(ref))
    revoked = first.create_key("team", ["read"])
    assert first.delete(f"/keys/{revoked.split('_')[1]}", first.admin).status_code == 200
    before = {
        path: first.get(path, team).json()
        for path in (
            f"/datasets/{ref.removeprefix('dataset:')}",
            f"/jobs/{done}",
            f"/jobs/{waiting}",
            f"/jobs/{done}/metrics",
            "/models/iris",
            "/models/iris/versions/prod",
        )
    }
    bundle = first.get("/models/iris/versions/1/bundle", team).content
    files = first.artifact_files()
    first.close()

    # the server comes back: same home, new services, its own lifespan
    svc = build_services(Settings(home=settings.home))
    try:
        assert bootstrap(svc) is None  # an admin key exists: no new one
        assert key_file.read_text().strip() == first.admin
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    finally:
        svc.db.dispose()
    with TestClient(create_app(Settings(home=settings.home))) as client:

        def get(path: str, key: str):
            return client.get(API + path, headers={"Authorization": f"Bearer {key}"})

        assert [p["name"] for p in get("/projects", first.admin).json()] == ["default", "team"]
        for path, body in before.items():
            r = get(path, team)
            assert r.status_code == 200, path
            assert r.json() == body, path
        assert get(f"/jobs/{waiting}", team).json()["state"] == "queued"
        again = get("/models/iris/versions/1/bundle", team)
        assert again.status_code == 200
        assert _contents(again.content) == _contents(bundle)
        assert get("/datasets", first.admin).status_code == 200
        assert get("/datasets", revoked).status_code == 401
        keys = get("/keys", first.admin).json()
        assert len(keys) == 3
    assert first.artifact_files() == files
