"""End to end: `kiln up` as a real process, a worker killed mid-job, the job resumed.

The server, its supervisor and its worker processes are the real ones; the test talks
to them over HTTP only and reads the worker's pid from the job (``host:pid:suffix``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import free_port, kiln_env, start_process, wait_for

pytestmark = pytest.mark.e2e

EPOCHS = 40


def workers_of(server_pid: int) -> list[int]:
    """The worker processes ``kiln up`` (``server_pid``) started and that still run."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue  # it just exited
        if b"kiln.jobs.worker" in args and b"--parent" in args:
            parent = args[args.index(b"--parent") + 1]
            zombie = "\nState:\tZ" in status
            if parent == str(server_pid).encode() and not zombie:
                found.append(int(entry.name))
    return found


class Server:
    """A `kiln up` process and what it printed."""

    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.out = home.parent / "server.log"
        env = kiln_env(
            home,
            KILN_HEARTBEAT_SECONDS="0.5",
            KILN_HEARTBEAT_TIMEOUT="3",
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        command = "from kiln.cli.main import main; main()"  # our own interpreter and module
        args = ["up", "--port", str(port), "--workers", "1"]
        self.proc = start_process([sys.executable, "-c", command, *args], self.out, env)
        self.url = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def check_running(self) -> None:
        assert self.proc.poll() is None, f"kiln up exited with {self.proc.returncode}"

    def cleanup(self) -> None:
        stray = workers_of(self.proc.pid) if Path("/proc").is_dir() else []
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    if not Path("/proc").is_dir():
        pytest.skip("finds worker processes through /proc")
    started = Server(tmp_path / "home", free_port())
    yield started
    started.cleanup()


def wine_csv() -> bytes:
    from sklearn.datasets import load_wine

    data: bytes = load_wine(as_frame=True).frame.to_csv(index=False).encode()
    return data


def test_a_killed_worker_is_replaced_and_its_job_resumes(server: Server) -> None:
    try:
        run_scenario(server)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- kiln up output ---\n{server.output()}") from exc


def run_scenario(server: Server) -> None:
    key_file = server.home / "admin.key"

    def healthy() -> bool:
        server.check_running()
        try:
            return key_file.exists() and httpx.get(f"{server.url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, timeout=60, interval=0.1, what="kiln up to answer /healthz")
    key = key_file.read_text().strip()
    api = httpx.Client(
        base_url=f"{server.url}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )

    uploaded = api.post("/datasets", files={"file": ("wine.csv", wine_csv(), "text/csv")})
    assert uploaded.status_code == 201, uploaded.text
    spec = {
        "name": "wine",
        "task": "classification",
        "data": {"source": uploaded.json()["ref"], "target": "target"},
        "model": {"type": "mlp", "hidden": [64, 64]},
        "train": {"epochs": EPOCHS, "batch_size": 8, "device": "cpu"},
    }
    submitted = api.post("/jobs", json={"kind": "train", "spec": spec})
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]

    def job() -> dict[str, Any]:
        server.check_running()
        got = api.get(f"/jobs/{job_id}")
        assert got.status_code == 200, got.text
        body: dict[str, Any] = got.json()
        return body

    def at_epoch_2() -> dict[str, Any] | None:
        body = job()
        assert body["state"] in ("queued", "running"), body
        return body if body["progress"].get("epoch", 0) >= 2 else None

    running = wait_for(at_epoch_2, timeout=90, what="epoch 2")
    first = int(running["worker"].rsplit(":", 2)[1])
    assert first in workers_of(server.proc.pid), running["worker"]
    scratch = server.home / "scratch"
    (left,) = [f for f in scratch.iterdir() if f.name.startswith(f"{first}-")]
    (job_folder,) = left.iterdir()
    assert job_folder.name.startswith(f"kiln-{job_id}-")  # holding its dataset
    os.kill(first, signal.SIGKILL)
    killed_at = job()["progress"]["epoch"]
    assert killed_at < EPOCHS, "the job ended before its worker was killed; make it longer"

    # the supervisor starts a new worker, which re-queues the job once its heartbeat
    # is over KILN_HEARTBEAT_TIMEOUT old, claims it and resumes from the checkpoint
    def finished() -> dict[str, Any] | None:
        body = job()
        return body if body["state"] not in ("queued", "running") else None

    done = wait_for(finished, timeout=120, interval=0.2, what="the job to end")
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2, done
    assert int(done["worker"].rsplit(":", 2)[1]) != first
    assert done["result"]["version"] == 1
    assert not left.exists()  # the killed worker's job folder, removed by its successor

    logs = api.get(f"/jobs/{job_id}/logs").json()
    messages = [entry["message"] for entry in logs]
    resumed = [m for m in messages if m.startswith("resumed from the checkpoint of epoch ")]
    assert len(resumed) == 1, messages
    assert int(resumed[0].rsplit(" ", 1)[-1]) >= 2
    epochs = api.get(f"/jobs/{job_id}/metrics").json()["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))

    version = api.get("/models/wine/versions/1")
    assert version.status_code == 200, version.text
    assert version.json()["version"] == 1
    api.close()

    # Ctrl-C: the server drains its (idle) workers and exits
    server.proc.send_signal(signal.SIGINT)
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError("kiln up did not exit within 30 s of SIGINT") from None
    assert server.proc.returncode == 0, server.proc.returncode
    assert wait_for(lambda: not workers_of(server.proc.pid), timeout=5, what="no worker left")
    assert list(scratch.iterdir()) == []  # workers that exit cleanly leave nothing
