"""``kiln up`` and ``kiln worker``: run the platform on this machine.

The server's modules (FastAPI, SQLAlchemy, uvicorn) load when a command runs, so
``kiln --help`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kiln.cli.errors import reports_errors
from kiln.cli.options import RayOpt


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
    ray: RayOpt = None,
) -> None:
    """Run the API server and its workers (database and artifacts under KILN_HOME).

    The first start creates the 'default' project and an admin API key (shown once).
    The key is also written to $KILN_HOME/admin.key, readable by you only.
    Ctrl-C drains the workers: running jobs finish. A second Ctrl-C stops them now.
    With --ray, the workers train specs that set train.resources on that Ray cluster.
    """
    from kiln.server import up as run_up
    from kiln.settings import Settings

    settings = Settings() if ray is None else Settings(ray_address=ray)
    run_up(settings, host=host, port=port, workers=workers)


@reports_errors
def worker(
    ray: RayOpt = None,
) -> None:
    """Run one worker: take jobs from the queue in the database KILN_DATABASE_URL names.

    Workers on other machines share one KILN_DATABASE_URL and KILN_ARTIFACTS (and
    KILN_RAY_ADDRESS, or --ray, to train specs with train.resources on a Ray cluster).
    SIGTERM or Ctrl-C drains (the running job finishes); a second signal stops it.
    """
    from kiln.jobs.worker import main
    from kiln.settings import Settings

    main(Settings() if ray is None else Settings(ray_address=ray))


@reports_errors
def rotate_master(
    new_key_file: Annotated[
        Path | None,
        typer.Option(
            "--new-key-file",
            help="With KILN_MASTER_KEY: write the new key to this new file (0600) "
            "instead of printing it.",
        ),
    ] = None,
) -> None:
    """Replace the master key: re-wrap every data key with a new one (data stays as is).

    Runs on the server machine against KILN_DATABASE_URL; stop kiln up and its workers
    first. With the key file, the new key replaces $KILN_HOME/master.key. With
    KILN_MASTER_KEY, the new key is printed (or written to --new-key-file): put it in
    KILN_MASTER_KEY before the next start; the old key no longer works.
    """
    from kiln.settings import Settings
    from kiln.store.crypto import MasterKey, rotate_master_key

    def show(new: MasterKey) -> None:
        typer.echo(f"New master key (shown once; set KILN_MASTER_KEY to it):\n  {new.encoded()}")

    done = rotate_master_key(Settings(), new_key_file=new_key_file, before_commit=show)
    where = f"; the new key is in {done.key_file}" if done.key_file else ""
    typer.echo(f"Re-wrapped {done.rewrapped} data key(s) (master key {done.new_key.id}){where}")


@reports_errors
def encrypt_existing() -> None:
    """Encrypt in place every artifact stored before encryption at rest (once, on upgrade).

    Runs on the server machine with its master key; objects already encrypted are skipped.
    """
    from kiln.settings import Settings
    from kiln.store.crypto import open_artifacts
    from kiln.store.db import Database, migrate

    settings = Settings()
    migrate(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    try:
        count = open_artifacts(settings, db).encrypt_existing()
    finally:
        db.dispose()
    typer.echo(f"Encrypted {count} artifacts")
