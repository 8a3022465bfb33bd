"""``kiln up``: the API server and its worker processes, on one machine.

First start: migrate the database, create the ``default`` project and a global admin
key, print the key once and write it to ``$KILN_HOME/admin.key`` (mode 0600). No
default password exists. Workers run as child processes (``kiln worker``); one that
dies is restarted, and its job is recovered by heartbeat expiry. Ctrl-C (or SIGTERM)
drains the workers: running jobs finish, a second Ctrl-C stops them to resume later.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import select

from kiln.services import Services
from kiln.settings import Settings
from kiln.store.keys import create_key
from kiln.store.projects import DEFAULT_PROJECT, ensure_project
from kiln.store.tables import ApiKey

log = logging.getLogger("kiln.server")


def bootstrap(services: Services) -> str | None:
    """Create the default project, and a global admin key if there is none.

    Returns the new key (to print once), or None when one already exists.
    """
    with services.db.session() as s:
        ensure_project(s, DEFAULT_PROJECT)
        existing = s.scalars(
            select(ApiKey).where(ApiKey.project_id.is_(None), ApiKey.revoked_at.is_(None))
        ).first()
        if existing is not None:
            return None
        _row, secret = create_key(s, project_id=None, scopes=["admin"], name="admin (kiln up)")
    write_key_file(services.settings.admin_key_file, secret)
    return secret


def preregister(services: Services) -> None:
    """Put the packaged MiniLM in the catalog as ``base:minilm-l6`` (once: a later start,
    or a name an admin took, copies nothing), so the README's server examples run."""
    from kiln.errors import KilnError
    from kiln.store.catalog import ensure_packaged

    try:
        info = ensure_packaged(services.db, services.store)
    except KilnError as exc:  # the server runs without it; say why
        log.warning("could not register the packaged MiniLM: %s", exc.message)
        return
    if info is not None:
        print(f"Registered the base model {info.ref} ({info.source})", flush=True)


def write_key_file(path: Path, secret: str) -> None:
    """Write the key readable by its owner only (0600), created that way, never widened."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    os.replace(tmp, path)


class Supervisor:
    """Keeps ``count`` worker processes alive until told to drain."""

    def __init__(self, count: int, env: dict[str, str] | None = None) -> None:
        self.count = count
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        # A session of its own: a Ctrl-C in the terminal reaches the supervisor only,
        # which then drains the workers in order. Workers watch their parent, and
        # drain if it dies.
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "kiln.jobs.worker", "--parent", str(os.getpid())],
            env=self.env,
            start_new_session=True,
        )

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.count)]
        self._thread.start()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _watch(self) -> None:
        while not self.stopping.wait(1.0):
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and not self.stopping.is_set():
                    log.warning(
                        "worker %d exited (%s); starting a new one", proc.pid, proc.returncode
                    )
                    self.procs[i] = self._spawn()

    def drain(self, timeout: float | None = None) -> None:
        """SIGTERM every worker (finish the running job) and wait; on a second Ctrl-C
        or past ``timeout``, signal again (stop now, the job resumes later)."""
        self.stopping.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for proc in self.procs:
                left = None if deadline is None else max(0.1, deadline - time.monotonic())
                proc.wait(left)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in self.procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def up(settings: Settings, *, host: str, port: int, workers: int) -> None:
    """Run the API server in this process and ``workers`` worker processes beside it."""
    import uvicorn

    from kiln.app import build_services, create_app
    from kiln.store.keyring import master_key_file

    master = master_key_file(settings)
    new_master = settings.master_key is None and not master.exists()
    services = build_services(settings)  # encryption at rest: makes master.key if new
    if new_master and master.exists():
        print(
            f"Created the master key {master} (mode 0600): back it up, the artifacts "
            "cannot be read without it",
            flush=True,
        )
    key = bootstrap(services)
    if key is not None:
        print(
            f"Created the admin API key (shown once; also in {settings.admin_key_file}):\n"
            f"  {key}\n",
            flush=True,
        )
    preregister(services)
    env = None
    if settings.ray_address:  # the workers read their settings from the environment
        env = {**os.environ, "KILN_RAY_ADDRESS": settings.ray_address}
    supervisor = Supervisor(workers, env)
    supervisor.start()
    print(
        f"kiln on http://{host}:{port}  (dashboard: /, OpenAPI: /docs)  workers: {workers}  "
        f"database: {_redacted(settings.resolved_database_url)}  "
        f"artifacts: {settings.resolved_artifacts}"
        + (f"  ray: {settings.ray_address}" if settings.ray_address else ""),
        flush=True,
    )
    app = create_app(settings, services=services)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        if workers:
            print("draining workers (running jobs finish; Ctrl-C again to stop them now)")
        supervisor.drain()
        services.db.dispose()


def _redacted(url: str) -> str:
    """A database URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
