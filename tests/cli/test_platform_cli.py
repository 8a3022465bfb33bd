"""kiln up and kiln worker as real processes, and the import cost of the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

from kiln.cli.main import app
from kiln.client import Client

runner = CliRunner()
KILN = str(Path(sys.executable).parent / "kiln")
SPEC = {
    "name": "iris-proc",
    "task": "classification",
    "data": {"source": "sklearn:iris", "target": "target"},
    "model": {"type": "linear"},
    "train": {"epochs": 2, "device": "cpu"},
}


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    return {**env, "KILN_HOME": str(home)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def _start(args: list[str], home: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen([KILN, *args], env=_env(home), stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes], sig: int) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(60)


def test_kiln_up_and_kiln_worker_processes_run_a_job_and_stop_cleanly(tmp_path: Path) -> None:
    """``kiln up --workers 0`` serves; a separate ``kiln worker`` takes the job."""
    home = tmp_path / "home"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    up_log, worker_log = tmp_path / "up.log", tmp_path / "worker.log"
    up = _start(["up", "--port", str(port), "--workers", "0"], home, up_log)
    worker = None
    try:
        deadline = time.monotonic() + 60
        while True:
            assert up.poll() is None, up_log.read_text()
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "kiln up did not start"
                time.sleep(0.1)
        key_file = home / "admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        with Client(url, key) as client:
            queued = client.jobs.submit(SPEC)
            worker = _start(["worker"], home, worker_log)
            job = client.jobs.wait(queued["id"], timeout=120, poll=0.1)
        assert job["state"] == "succeeded", worker_log.read_text()
        assert job["model_version"] == {"model": "iris-proc", "version": 1}
        assert job["worker"].split(":")[1] == str(worker.pid)
    finally:
        worker_code = _stop(worker, signal.SIGTERM) if worker is not None else None
        up_code = _stop(up, signal.SIGINT)
    assert worker_code == 0, worker_log.read_text()
    assert "drained, exiting" in worker_log.read_text()
    assert up_code == 0, up_log.read_text()
    printed = up_log.read_text()
    assert key in printed and "shown once" in printed and f"127.0.0.1:{port}" in printed
