"""Fixtures of the security probes: the API test servers of tests/api, reused.

``platform`` / ``make_platform`` (fresh servers) and ``world`` (projects ``alpha`` and
``beta`` with data, finished jobs, versions and keys, rate limits off) are those of
``tests/api/conftest.py``. ``served`` is ``world`` with the app's lifespan running
(the deployment manager, as under ``kiln up``), for probes that reach deployments.
Every 4xx a probe sees is checked against the one error shape, as in tests/api.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from api.conftest import (  # noqa: F401 - fixtures, found by name
    API,
    Platform,
    World,
    make_platform,
    platform,
    world,
)


@pytest.fixture(scope="session")
def served(world: World) -> Iterator[World]:  # noqa: F811 - the fixture, by name
    with world.client:  # runs the lifespan: the deployment manager starts, and stops after
        yield world
