"""Fixtures of the security probes: the API test servers of tests/api, reused.

``platform`` / ``make_platform`` (fresh servers) are those of ``tests/api/conftest.py``;
``world`` is built like its namesake there (projects ``alpha`` and ``beta`` with data,
finished jobs, versions and keys), with the per-key rate limits off: a probe sends
hundreds of requests with one key as fast as the app answers, and a 429 would stand in
for the answer being probed. ``served`` is ``world`` with the app's lifespan running
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
    train_spec,
)
from kiln.settings import Settings


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """alpha: iris dataset, model ``iris`` v1 and v2 (jobs ``train1``, ``train2``);
    beta: wine dataset, model ``wine`` v1 (job ``beta_train``) with alias ``production``.
    Probes may add resources of their own but must not change these."""
    home = tmp_path_factory.mktemp("security-world") / "home"
    w = World(Settings(home=home, rate_limit_api="off", rate_limit_inference="off"))
    w.create_project("alpha")
    w.create_project("beta")
    w.keys = {
        "alpha_admin": w.create_key("alpha", ["admin"]),
        "alpha_read": w.create_key("alpha", ["read"]),
        "alpha_train": w.create_key("alpha", ["read", "train"]),
        "alpha_deploy": w.create_key("alpha", ["read", "deploy"]),
        "beta_admin": w.create_key("beta", ["admin"]),
    }
    alpha, beta = w.keys["alpha_train"], w.keys["beta_admin"]
    w.refs = {"alpha": w.dataset(alpha, "iris"), "beta": w.dataset(beta, "wine")}
    w.jobs = {
        "train1": w.queued(alpha, "train", train_spec(w.refs["alpha"], epochs=2)),
        "train2": w.queued(alpha, "train", train_spec(w.refs["alpha"], epochs=3)),
        "beta_train": w.queued(beta, "train", train_spec(w.refs["beta"], name="wine")),
    }
    w.run_jobs()
    r = w.put("/models/wine/aliases/production", beta, {"version": 1})
    assert r.status_code == 200, r.text
    yield w
    w.close()


@pytest.fixture(scope="session")
def served(world: World) -> Iterator[World]:
    with world.client:  # runs the lifespan: the deployment manager starts, and stops after
        yield world
