"""kiln up and kiln worker as real processes, and the import cost of the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiln.cli.main import app
from kiln.client import Client
from support import free_port, kiln_env, start_process, stop_process, wait_for_http

runner = CliRunner()
KILN = str(Path(sys.executable).parent / "kiln")
SPEC = {
    "name": "iris-proc",
    "task": "classification",
    "data": {"source": "sklearn:iris", "target": "target"},
    "model": {"type": "linear"},
    "train": {"epochs": 2, "device": "cpu"},
}


def test_up_and_worker_help() -> None:
    up = runner.invoke(app, ["up", "--help"])
    assert up.exit_code == 0, up.output
    assert "--port" in up.stdout and "--workers" in up.stdout and "127.0.0.1" in up.stdout
    worker = runner.invoke(app, ["worker", "--help"])
    assert worker.exit_code == 0 and "KILN_DATABASE_URL" in worker.stdout


HEAVY_PROBE = """
import json, sys
from typer.testing import CliRunner
from kiln.cli.main import app
for args in (["--help"], ["up", "--help"], ["jobs", "--help"], ["models", "list", "--help"],
             ["serve", "--help"], ["deployments", "--help"], ["deployments", "predict", "--help"]):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
heavy = ("torch", "fastapi", "sqlalchemy", "uvicorn", "httpx", "numpy", "pandas")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def test_help_of_the_platform_commands_imports_no_server_or_ml_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", HEAVY_PROBE], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


@pytest.mark.e2e
def test_kiln_up_and_kiln_worker_processes_run_a_job_and_stop_cleanly(tmp_path: Path) -> None:
    """``kiln up --workers 0`` serves; a separate ``kiln worker`` takes the job."""
    home = tmp_path / "home"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    up_log, worker_log = tmp_path / "up.log", tmp_path / "worker.log"
    up_args = [KILN, "up", "--port", str(port), "--workers", "0"]
    up = start_process(up_args, up_log, kiln_env(home))
    worker = None
    try:
        wait_for_http(f"{url}/healthz", proc=up, log=up_log, timeout=60)
        key_file = home / "admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        with Client(url, key) as client:
            queued = client.jobs.submit(SPEC)
            worker = start_process([KILN, "worker"], worker_log, kiln_env(home))
            job = client.jobs.wait(queued["id"], timeout=120, poll=0.1)
        assert job["state"] == "succeeded", worker_log.read_text()
        assert job["model_version"] == {"model": "iris-proc", "version": 1}
        assert job["worker"].split(":")[1] == str(worker.pid)
    finally:
        worker_code = stop_process(worker, signal.SIGTERM) if worker is not None else None
        up_code = stop_process(up, signal.SIGINT)
    assert worker_code == 0, worker_log.read_text()
    assert "drained, exiting" in worker_log.read_text()
    assert up_code == 0, up_log.read_text()
    printed = up_log.read_text()
    assert key in printed and "shown once" in printed and f"127.0.0.1:{port}" in printed
