"""``kiln up`` and ``kiln worker``: run the platform on this machine.

The server's modules (FastAPI, SQLAlchemy, uvicorn) load when a command runs, so
``kiln --help`` stays cheap.
"""

from __future__ import annotations

from typing import Annotated

import typer

from kiln.cli.errors import reports_errors


@reports_errors
def up(
    host: Annotated[
        str,
        typer.Option("--host", help="Interface to bind; anything but 127.0.0.1 exposes the API."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8080,
    workers: Annotated[
        int, typer.Option("--workers", "-w", min=0, help="Worker processes that run jobs.")
    ] = 1,
) -> None:
    """Run the API server and its workers (database and artifacts under KILN_HOME).

    The first start creates the 'default' project and an admin API key (shown once).
    The key is also written to $KILN_HOME/admin.key, readable by you only.
    Ctrl-C drains the workers: running jobs finish. A second Ctrl-C stops them now.
    """
    from kiln.server import up as run_up
    from kiln.settings import Settings

    run_up(Settings(), host=host, port=port, workers=workers)


@reports_errors
def worker() -> None:
    """Run one worker: take jobs from the queue in the database KILN_DATABASE_URL names.

    Workers on other machines share one KILN_DATABASE_URL and KILN_ARTIFACTS.
    SIGTERM or Ctrl-C drains (the running job finishes); a second signal stops it.
    """
    from kiln.jobs.worker import main

    main()
