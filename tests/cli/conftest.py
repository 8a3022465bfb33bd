"""Fixtures for the CLI tests that talk to a running kiln server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cli.live_server import Platform, running_platform


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A kiln server with a worker, fresh for each test module."""
    home, roots = tmp_path_factory.mktemp("kiln-home"), tmp_path_factory.mktemp("data-roots")
    with running_platform(home, data_roots=[roots]) as running:
        yield running
