"""Key revocation cannot lock kiln out: the last active global admin key stays, and the
key a request is made with is revoked only when the caller confirms it.

The real app of tests/api (``platform``: SQLite and a local store under tmp_path, over
ASGI), and the ``kiln keys revoke`` command against a live server.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from api.conftest import Platform
from cli.live_server import running_platform
from kiln.cli.main import app as cli_app
from kiln.client import Client
from kiln.errors import ConflictError
from kiln.store import keys
from kiln.store.db import Database, migrate
from kiln.store.keys import Principal, create_key
from kiln.store.tables import ApiKey, utcnow


def key_id(secret: str) -> str:
    return secret.split("_")[1]


def new_key(
    platform: Platform, key: str, scopes: list[str], project: str | None = None
) -> tuple[str, str]:
    """(id, secret) of a key made with ``key``."""
    r = platform.post("/keys", key, {"scopes": scopes, "project": project})
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["key"]


def test_the_last_global_admin_key_cannot_be_revoked(platform: Platform) -> None:
    admin_id = key_id(platform.admin)
    # even confirmed: it is the only key that can make another
    r = platform.delete(f"/keys/{admin_id}", platform.admin, confirm_self="true")
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "conflict" and error["field"] == "key_id"
    assert "last active global admin key" in error["message"]
    assert "kiln keys create --scope admin" in error["message"]  # how to get out of it
    assert platform.get("/keys", platform.admin).status_code == 200  # still works
    # a project admin key does not count as a global one
    platform.post("/projects", platform.admin, {"name": "p"})
    new_key(platform, platform.admin, ["admin"], project="p")
    r = platform.delete(f"/keys/{admin_id}", platform.admin, confirm_self="true")
    assert r.status_code == 409, r.text

    # with a second global admin key, the first can go (here revoked by the second)
    second_id, second = new_key(platform, platform.admin, ["admin"])
    r = platform.delete(f"/keys/{admin_id}", second)
    assert r.status_code == 200, r.text
    assert r.json()["revoked_at"] is not None
    assert platform.get("/keys", platform.admin).status_code == 401
    # and now the second is the last one
    r = platform.delete(f"/keys/{second_id}", second, confirm_self="true")
    assert r.status_code == 409, r.text
    assert platform.get("/keys", second).status_code == 200


def test_revoking_your_own_key_needs_confirmation(platform: Platform) -> None:
    _, other = new_key(
        platform, platform.admin, ["admin"]
    )  # so the last-admin rule is not what stops it
    admin_id = key_id(platform.admin)
    r = platform.delete(f"/keys/{admin_id}", platform.admin)
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["field"] == "confirm_self"
    assert "confirm_self=true" in error["message"] and "--yes" in error["message"]
    assert platform.get("/keys", platform.admin).status_code == 200  # not revoked

    r = platform.delete(f"/keys/{admin_id}", platform.admin, confirm_self="true")
    assert r.status_code == 200, r.text
    assert platform.get("/keys", platform.admin).status_code == 401  # at once
    assert platform.get("/keys", other).status_code == 200

    # a project admin key too, and revoking someone else's key needs no confirmation
    platform.post("/projects", other, {"name": "p"})
    _, project_admin = new_key(platform, other, ["admin"], project="p")
    reader_id, reader = new_key(platform, project_admin, ["read"])
    assert platform.delete(f"/keys/{reader_id}", project_admin).status_code == 200
    assert platform.get("/models", reader).status_code == 401
    own = key_id(project_admin)
    assert platform.delete(f"/keys/{own}", project_admin).status_code == 409
    r = platform.delete(f"/keys/{own}", project_admin, confirm_self="true")
    assert r.status_code == 200, r.text


def test_refusals_are_audited_and_revoking_twice_is_harmless(platform: Platform) -> None:
    admin_id = key_id(platform.admin)
    assert platform.delete(f"/keys/{admin_id}", platform.admin).status_code == 409
    _, second = new_key(platform, platform.admin, ["admin"])
    assert platform.delete(f"/keys/{admin_id}", second).status_code == 200
    assert platform.delete(f"/keys/{admin_id}", second).status_code == 200  # already
    events = platform.get("/audit", second).json()["items"]
    revokes = [(e["outcome"], e["status"]) for e in events if e["action"] == "keys.revoke"]
    assert revokes == [("ok", 200), ("ok", 200), ("conflict", 409)]  # newest first


def test_the_cli_and_the_client_ask_for_confirmation(tmp_path: Path) -> None:
    runner = CliRunner()
    with running_platform(tmp_path / "home", worker=False) as live:
        admin_id = key_id(live.admin_key)

        def kiln(*args: str) -> tuple[int, str]:
            result = runner.invoke(
                cli_app, ["keys", *args, "--url", live.url, "--api-key", live.admin_key]
            )
            return result.exit_code, result.output

        code, out = kiln("revoke", admin_id, "--yes")
        assert code == ConflictError.exit_code, out
        assert "last active global admin key" in out
        with Client(live.url, live.admin_key) as client:
            other = client.keys.create(["admin"])
            with pytest.raises(ConflictError) as refused:
                client.keys.revoke(admin_id)
            assert refused.value.field == "confirm_self"
        code, out = kiln("revoke", admin_id)
        assert code == ConflictError.exit_code and "--yes" in out, out
        code, out = kiln("revoke", admin_id, "--yes")
        assert code == 0 and f"revoked key {admin_id}" in out, out
        with Client(live.url, other["key"]) as client:
            assert [k["revoked_at"] is not None for k in client.keys.list()] == [True, False]


@pytest.fixture(params=["sqlite", "postgres"])
def key_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = (
        f"sqlite:///{tmp_path / 'kiln.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    migrate(url)
    db = Database(url)
    yield db
    db.dispose()


def test_two_admins_revoking_each_other_at_once_leave_one(key_db: Database) -> None:
    """Each of two global admin keys revokes the other, at the same moment: one wins,
    the other is refused as the last one (the rows are locked while counted)."""
    rounds = 8
    for _ in range(rounds):
        with key_db.session() as s:
            pair = [create_key(s, project_id=None, scopes=["admin"])[0] for _ in range(2)]
            principals = [
                Principal(key_id=k.id, project_id=None, project=None, scopes=frozenset(["admin"]))
                for k in pair
            ]
        start = threading.Barrier(2)
        outcomes: list[str] = []
        threads = [
            threading.Thread(
                target=_revoke, args=(key_db, start, outcomes, principals[0], pair[1].id)
            ),
            threading.Thread(
                target=_revoke, args=(key_db, start, outcomes, principals[1], pair[0].id)
            ),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["conflict", "revoked"]
        with key_db.session() as s:
            active = [k for k in keys.list_keys(s, principals[0]) if k.revoked_at is None]
        assert len(active) == 1
        # leave none of this round active, so the next round's pair is again the only two
        with key_db.session() as s:
            for row in s.scalars(select(ApiKey)):
                row.revoked_at = row.revoked_at or utcnow()


def _revoke(
    db: Database, start: threading.Barrier, outcomes: list[str], who: Principal, target: str
) -> None:
    start.wait()  # both at once
    try:
        with db.session() as s:
            keys.revoke(s, who, target)
        outcomes.append("revoked")
    except ConflictError:
        outcomes.append("conflict")
