"""Fixtures for the CLI tests that talk to a running kiln server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.live_server import Platform, running_platform


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A kiln server with a worker, fresh for each test module."""
    home, roots = tmp_path_factory.mktemp("kiln-home"), tmp_path_factory.mktemp("data-roots")
    with running_platform(home, data_roots=[roots]) as running:
        yield running


@pytest.fixture
def env(platform: Platform, tmp_path: Path) -> dict[str, str | None]:
    """The client environment: the server, its admin key, and a KILN_HOME of our own."""
    return {
        "KILN_URL": platform.url,
        "KILN_API_KEY": platform.admin_key,
        "KILN_HOME": str(tmp_path / "client-home"),
        "KILN_PROJECT": None,
        "COLUMNS": "160",  # tables as on a wide terminal (Rich reads it)
    }
