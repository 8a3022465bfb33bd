"""The application a server runs: the API, the dashboard, and the deployments' lifespan.

``create_app(settings)`` opens the database (migrating it to the head) and the
artifact store on start-up; tests (and ``kiln up``, ``kiln serve``) pass their own
``Services`` from :func:`build_services`. This is wiring: it sits above ``kiln.api``
and ``kiln.web``, which never import each other's assembly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from kiln.api.app import create_api
from kiln.api.ratelimit import RateLimits
from kiln.jobs.queue import Queue
from kiln.jobs.scratch import release, worker_scratch
from kiln.services import Services
from kiln.settings import Settings
from kiln.store.crypto import open_artifacts
from kiln.store.db import Database, migrate
from kiln.web import mount as mount_dashboard


def build_services(settings: Settings) -> Services:
    """Open (and migrate) the database and the artifact store named by the settings."""
    url = settings.resolved_database_url
    migrate(url)
    db = Database(url)
    store = open_artifacts(settings, db)  # encrypted; a wrong master key fails here
    return Services(
        settings=settings,
        db=db,
        store=store,
        queue=Queue(db, heartbeat_timeout=settings.heartbeat_timeout),
        rate=RateLimits(db, api=settings.rate_limit_api, inference=settings.rate_limit_inference),
    )


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> FastAPI:
    """The API with the dashboard at ``/``; its deployments are restored on start-up.

    Without ``services``, they are built from ``settings`` on start-up and closed on
    shut-down; given ones stay open (their owner disposes of them).
    """
    settings = settings or (services.settings if services else Settings())
    app = create_api(settings, lifespan=_lifespan(settings, services))
    if services is not None:
        app.state.services = services
    mount_dashboard(app)  # the web dashboard at /
    return app


def _lifespan(
    settings: Settings, services: Services | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start-up: the services (unless given) and the deployment manager; shut-down: both."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # lazily: the serving stack (and torch) only when a server starts
        from kiln.monitor.metrics import ServingMetrics
        from kiln.serve.deployments import DeploymentManager

        own = services is None
        svc = (
            services if services is not None else await run_in_threadpool(build_services, settings)
        )
        app.state.services = svc
        # uploads a killed API process (or worker) left in scratch go now
        scratch = await run_in_threadpool(worker_scratch, svc.settings.home_dir / "scratch")
        manager = DeploymentManager(
            svc.db,
            svc.store,
            # in this process's scratch: the decrypted copies are this process's alone,
            # and a killed process's are removed by the next one to start
            scratch / "deployments",
            ServingMetrics(),
            settings=svc.settings,
        )
        app.state.deployments = manager
        await manager.restore()  # deployments come back by themselves after a restart
        yield
        await manager.close()
        release(scratch)  # an API process that exits cleanly leaves no scratch folder
        if own:
            svc.db.dispose()

    return lifespan
