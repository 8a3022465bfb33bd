"""The PostgreSQL fixture itself: a real server and a fresh database per test."""

from __future__ import annotations

import pytest

from servers import _unavailable


def test_postgres_url_is_a_fresh_database(postgres_server: str, postgres_url: str) -> None:
    import psycopg

    assert postgres_url.startswith(postgres_server + "/kiln_")
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        name = conn.execute("select current_database()").fetchone()
        assert name is not None and postgres_url.endswith("/" + name[0])
        assert conn.execute(
            "select count(*) from pg_tables where schemaname = 'public'"
        ).fetchone() == (0,)


def test_missing_postgres_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        _unavailable("PostgreSQL not installed")
    monkeypatch.delenv("KILN_REQUIRE_POSTGRES")
    with pytest.raises(pytest.skip.Exception):
        _unavailable("PostgreSQL not installed")
