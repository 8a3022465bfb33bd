"""Fixtures that start real servers for the tests: S3 (moto's server mode) and PostgreSQL.

Imported by ``tests/conftest.py`` so every test can ask for them. Only the standard
library and pytest are imported at module level; moto, boto3 and psycopg load inside
the fixtures, so collecting tests stays cheap.

- ``s3_server`` (session): an HTTP S3-compatible server on 127.0.0.1; yields its
  endpoint URL. AWS credentials/region env vars are set to dummies for the session.
- ``s3_bucket`` (function): a fresh bucket on it; yields an :class:`S3Bucket`.
- ``postgres_server`` (session): a throwaway PostgreSQL cluster; yields
  ``postgresql+psycopg://postgres@127.0.0.1:PORT``. Skips when PostgreSQL is not
  installed, unless ``KILN_REQUIRE_POSTGRES=1`` (CI), which makes that a failure.
- ``postgres_url`` (function): a fresh database on it; yields its SQLAlchemy URL.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import free_port

# --- S3 ---------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Bucket:
    """A bucket on the test S3 server; ``url`` is an artifact store URL inside it."""

    name: str
    endpoint_url: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}/artifacts"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        # Dummy credentials, and nothing from the developer's own AWS setup.
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        # werkzeug logs every request at INFO; keep the test output quiet.
        mp.setattr(logging.getLogger("werkzeug"), "level", logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@functools.cache
def s3_client(endpoint_url: str) -> Any:
    """A boto3 S3 client for the test server (made once: clients take ~0.2 s each)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[S3Bucket]:
    client = s3_client(s3_server)
    bucket = S3Bucket(name=f"kiln-test-{uuid.uuid4().hex[:12]}", endpoint_url=s3_server)
    client.create_bucket(Bucket=bucket.name)
    yield bucket
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name):
        if page.get("Contents"):
            objects = [{"Key": obj["Key"]} for obj in page["Contents"]]
            client.delete_objects(Bucket=bucket.name, Delete={"Objects": objects})
    client.delete_bucket(Bucket=bucket.name)


# --- PostgreSQL ---------------------------------------------------------------------


def _postgres_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres (PATH first, then Debian's)."""
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent  # /usr/local/bin/initdb may be a symlink
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    newest = max(found, key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(newest).parent


def _unavailable(reason: str) -> None:
    if os.environ.get("KILN_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (KILN_REQUIRE_POSTGRES=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    bindir = _postgres_bin()
    if bindir is None:
        _unavailable("PostgreSQL not installed")
        return
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        try:
            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no 'postgres' system user")
            return
        as_user = ["runuser", "-u", "postgres", "--"]
    # Under /tmp (traversable by all) so the postgres user can reach it.
    base = Path(tempfile.mkdtemp(prefix="kiln-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
    sockets = base / "sock"
    sockets.mkdir()
    if as_user:
        for path in (base, sockets):
            os.chown(path, pg_user.pw_uid, pg_user.pw_gid)
    data, log, port = base / "data", base / "server.log", free_port()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*as_user, *args], cwd=base, capture_output=True, text=True, timeout=120
        )

    try:
        done = run(
            str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"initdb failed:\n{done.stdout}\n{done.stderr}", pytrace=False)
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        done = run(
            str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
            "-o", options, "start",
        )  # fmt: skip
        if done.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            pytest.fail(f"pg_ctl start failed:\n{done.stderr}\n{server_log}", pytrace=False)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        if (data / "postmaster.pid").exists():
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    import psycopg
    from psycopg import sql

    name = f"kiln_{uuid.uuid4().hex[:16]}"
    admin = postgres_server.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield f"{postgres_server}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
