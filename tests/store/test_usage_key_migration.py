"""Migration 0005 (usage events name the API key) on a database that already holds
usage: the old events keep their numbers with no key, new ones are written with one,
and the downgrade drops the column again. SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from kiln.monitor import usage
from kiln.store.db import MIGRATIONS, Database, migrate


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kiln.db'}"
    value: str = request.getfixturevalue("postgres_url")
    return value


def _alembic(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _columns(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns("usage_events")}
    finally:
        engine.dispose()


def test_upgrade_keeps_the_usage_of_a_database_at_0004(url: str) -> None:
    command.upgrade(_alembic(url), "0004")
    assert "key_id" not in _columns(url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO projects (name, created_at) VALUES ('default', CURRENT_TIMESTAMP)")
        )
        conn.execute(
            sa.text(
                "INSERT INTO usage_events (project_id, time, kind, quantity, device, subject) "
                "VALUES (1, CURRENT_TIMESTAMP, 'prediction_rows', 7, '', 'api')"
            )
        )
    engine.dispose()

    migrate(url)  # to the head: 0005 and whatever follows
    assert "key_id" in _columns(url)
    db = Database(url)
    try:
        with db.session() as s:
            usage.record(s, 1, "prompt_tokens", 11, subject="chat", key_id="abc123")
        with db.session() as s:
            split = usage.summary(s, 1, start=None, end=None, group_by="total", by=["key"])
        assert sorted((i["kind"], i["key"], i["quantity"]) for i in split["items"]) == [
            ("prediction_rows", "", 7.0),  # written before the migration: no key
            ("prompt_tokens", "abc123", 11.0),
        ]
    finally:
        db.dispose()

    command.downgrade(_alembic(url), "0004")
    assert "key_id" not in _columns(url)
