"""A real kiln platform for tests: the API under uvicorn on 127.0.0.1, and a worker.

``running_platform(home)`` migrates a fresh SQLite database under ``home``, runs
``bootstrap`` for the admin key, serves ``create_app`` over real HTTP from a thread
(on a port the OS picks) and runs a :class:`~kiln.jobs.worker.Worker` in another
thread, so submitted jobs really execute. Used by tests/test_client.py and the CLI
tests; everything stops (and the database closes) when the context exits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import serve_app


@dataclass(frozen=True)
class Platform:
    url: str
    admin_key: str
    home: Path
    services: Any  # kiln.services.Services


@contextmanager
def running_platform(home: Path, *, worker: bool = True, **settings: Any) -> Iterator[Platform]:
    """The platform; ``worker=False`` leaves jobs queued (for a worker process of the test's)."""
    from kiln.app import build_services, create_app
    from kiln.jobs.worker import Worker
    from kiln.server import bootstrap
    from kiln.settings import Settings

    config = Settings(home=home, heartbeat_seconds=0.2, poll_seconds=0.05, **settings)
    services = build_services(config)
    key = bootstrap(services)
    assert key is not None
    runner = Worker(config, db=services.db, store=services.store, worker_id="test-worker")
    working = threading.Thread(target=runner.run, daemon=True)
    try:
        with serve_app(create_app(config, services=services), timeout=30) as url:
            if worker:
                working.start()
            try:
                yield Platform(url=url, admin_key=key, home=home, services=services)
            finally:
                runner.draining.set()  # a running job finishes first
                if worker:
                    working.join(120)
    finally:
        services.db.dispose()
    assert not working.is_alive()
