"""End to end on Ray: `kiln up --ray ADDRESS` as a real process whose worker hands a
train job with ``train.resources`` to a real local Ray cluster (2 workers of 1 CPU).

The job succeeds with the weights single-process training gives, records where it ran
and meters its worker-seconds; a Ray worker killed mid-job is replaced by Ray and the
run resumes from kiln's checkpoint, ending exactly where an uninterrupted run does.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from support import free_port, kiln_env, start_process, stop_process, wait_for

pytestmark = pytest.mark.distributed


class Platform:
    """A `kiln up --ray` process and an API client holding its admin key."""

    def __init__(self, home: Path, address: str) -> None:
        self.home = home
        self.log = home.parent / "server.log"
        port = free_port()
        env = kiln_env(
            home,
            KILN_HEARTBEAT_SECONDS="0.5",
            KILN_HEARTBEAT_TIMEOUT="3",
            KILN_RAY_RESOURCE_TIMEOUT="60",
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        command = "from kiln.cli.main import main; main()"
        args = ["up", "--port", str(port), "--workers", "1", "--ray", address]
        self.proc = start_process([sys.executable, "-c", command, *args], self.log, env)
        self.url = f"http://127.0.0.1:{port}"
        key_file = home / "admin.key"

        def healthy() -> bool:
            assert self.proc.poll() is None, self.output()
            try:
                return key_file.exists() and httpx.get(f"{self.url}/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=90, interval=0.2, what="kiln up to answer /healthz")
        self.api = httpx.Client(
            base_url=f"{self.url}/api/v1",
            headers={"Authorization": f"Bearer {key_file.read_text().strip()}"},
            timeout=30,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def job(self, job_id: str) -> dict[str, Any]:
        got = self.api.get(f"/jobs/{job_id}")
        assert got.status_code == 200, got.text
        body: dict[str, Any] = got.json()
        return body

    def finished(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            assert self.proc.poll() is None, self.output()
            body = self.job(job_id)
            return body if body["state"] not in ("queued", "running") else None

        done: dict[str, Any] = wait_for(ended, timeout=timeout, interval=0.5, what="the job")
        return done

    def close(self) -> None:
        self.api.close()
        stop_process(self.proc, signal.SIGINT, timeout=60)


@pytest.fixture(scope="module")
def platform(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """One `kiln up --ray` for the module's tests (each waits for its own job to end)."""
    started = Platform(tmp_path_factory.mktemp("platform") / "home", ray_address)
    yield started
    started.close()


def _csv(path: Path) -> Path:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(240, 5))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    frame["label"] = np.where(x[:, 0] - x[:, 2] + 0.3 * x[:, 4] > 0, "a", "b")
    frame.to_csv(path, index=False)
    return path


def _spec(source: str, epochs: int) -> dict[str, Any]:
    return {
        "name": "ray-mlp",
        "task": "classification",
        "data": {"source": source, "target": "label"},
        "model": {"type": "mlp", "hidden": [32, 16]},
        "train": {
            "epochs": epochs,
            "batch_size": 8,
            "optimizer": {"name": "adam", "lr": 0.005},
            "device": "cpu",
            "resources": {"workers": 2, "cpus_per_worker": 1},
        },
    }


def _in_process(csv: Path, epochs: int) -> dict[str, Any]:
    """What one process trains from the same data and spec (no resources)."""
    import kiln

    spec = _spec(str(csv), epochs)
    del spec["train"]["resources"]
    metrics: dict[str, Any] = kiln.fit(spec).meta.metrics
    return metrics


def _submit(platform: Platform, csv: Path, epochs: int) -> str:
    uploaded = platform.api.post(
        "/datasets", files={"file": ("table.csv", csv.read_bytes(), "text/csv")}
    )
    assert uploaded.status_code == 201, uploaded.text
    submitted = platform.api.post(
        "/jobs", json={"kind": "train", "spec": _spec(uploaded.json()["ref"], epochs)}
    )
    assert submitted.status_code == 201, submitted.text
    job_id: str = submitted.json()["id"]
    return job_id


def _assert_same_model(done: dict[str, Any], platform: Platform, expected: dict[str, Any]) -> None:
    version = platform.api.get(f"/models/ray-mlp/versions/{done['result']['version']}")
    assert version.status_code == 200, version.text
    got = version.json()["metrics"]
    for split in ("test", "val"):
        assert got[split]["log_loss"] == pytest.approx(expected[split]["log_loss"], rel=1e-5)
        assert got[split]["accuracy"] == expected[split]["accuracy"]


def test_a_job_trains_on_two_ray_workers_like_one_process(
    platform: Platform, tmp_path: Path
) -> None:
    csv = _csv(tmp_path / "table.csv")
    job_id = _submit(platform, csv, epochs=4)
    done = platform.finished(job_id)
    assert done["state"] == "succeeded", (done, platform.output())
    _assert_same_model(done, platform, _in_process(csv, epochs=4))

    executor = done["resources"]["executor"]
    assert executor["kind"] == "ray" and executor["ray_job_id"]
    assert sorted(w["rank"] for w in executor["workers"]) == [0, 1]
    assert all(w["cpus"] == 1.0 and w["gpus"] == 0.0 for w in executor["workers"])
    assert done["resources"]["attempts"][0]["executor"] == executor
    epochs = platform.api.get(f"/jobs/{job_id}/metrics").json()["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]  # recorded per epoch, as in-process

    totals = platform.api.get("/usage", params={"group_by": "total"}).json()["totals"]
    assert totals.get("worker_seconds", 0) >= executor["worker_seconds"] > 0, totals
    assert totals["compute_seconds"] > 0


def test_a_killed_ray_worker_is_replaced_and_the_run_resumes(
    platform: Platform, tmp_path: Path
) -> None:
    epochs = 40
    csv = _csv(tmp_path / "table.csv")
    job_id = _submit(platform, csv, epochs=epochs)

    def running_at_epoch_3() -> dict[str, Any] | None:
        body = platform.job(job_id)
        assert body["state"] in ("queued", "running"), (body, platform.output())
        executor = (body.get("resources") or {}).get("executor")
        workers = executor["workers"] if executor else []
        return body if body["progress"].get("epoch", 0) >= 3 and len(workers) == 2 else None

    running = wait_for(running_at_epoch_3, timeout=180, interval=0.2, what="epoch 3 on Ray")
    (rank1,) = [w for w in running["resources"]["executor"]["workers"] if w["rank"] == 1]
    os.kill(rank1["pid"], signal.SIGKILL)
    killed_at = platform.job(job_id)["progress"]["epoch"]
    assert killed_at < epochs, "the job ended before its Ray worker was killed"

    done = platform.finished(job_id, timeout=300)
    assert done["state"] == "succeeded", (done, platform.output())
    assert done["attempts"] == 1  # Ray replaced the worker; the kiln job kept its lease
    messages = [e["message"] for e in platform.api.get(f"/jobs/{job_id}/logs").json()]
    resumed = [m for m in messages if m.startswith("resumed from the checkpoint of epoch ")]
    assert len(resumed) == 1, messages
    assert int(resumed[0].rsplit(" ", 1)[-1]) >= 3
    pids = {w["pid"] for w in done["resources"]["executor"]["workers"]}
    assert rank1["pid"] not in pids  # the workers that finished are the new group
    series = platform.api.get(f"/jobs/{job_id}/metrics").json()["epochs"]
    assert [e["epoch"] for e in series] == list(range(1, epochs + 1))
    # the resumed run restored weights, optimizer and both RNGs: the same model
    _assert_same_model(done, platform, _in_process(csv, epochs=epochs))


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_cancelling_a_job_stops_its_ray_workers(platform: Platform, tmp_path: Path) -> None:
    job_id = _submit(platform, _csv(tmp_path / "table.csv"), epochs=400)

    def on_ray() -> dict[str, Any] | None:
        body = platform.job(job_id)
        assert body["state"] in ("queued", "running"), (body, platform.output())
        executor = (body.get("resources") or {}).get("executor")
        ready = executor and len(executor["workers"]) == 2 and body["progress"].get("epoch")
        return body if ready else None

    running = wait_for(on_ray, timeout=180, interval=0.2, what="the job on Ray")
    pids = [w["pid"] for w in running["resources"]["executor"]["workers"]]
    cancelled = platform.api.post(f"/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    done = platform.finished(job_id, timeout=90)
    assert done["state"] == "cancelled", done
    assert done["progress"]["epoch"] < 400
    wait_for(lambda: not any(_alive(p) for p in pids), timeout=60, what="the Ray workers to end")


def _kiln_workers(server_pid: int) -> list[int]:
    """The `kiln worker` processes `kiln up` (``server_pid``) started that still run."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"kiln.jobs.worker" in args
            and str(server_pid).encode() in args
            and _alive(int(entry.name))
        ):
            found.append(int(entry.name))
    return found


def test_a_killed_kiln_worker_requeues_the_job_which_resumes_on_ray(
    platform: Platform, tmp_path: Path
) -> None:
    """The driver itself lost: its Ray run ends with it; the next kiln worker re-queues the
    job and its new attempt resumes on Ray from the checkpoint in the artifact store."""
    epochs = 30
    csv = _csv(tmp_path / "table.csv")
    job_id = _submit(platform, csv, epochs=epochs)

    def at_epoch_3() -> dict[str, Any] | None:
        body = platform.job(job_id)
        assert body["state"] in ("queued", "running"), (body, platform.output())
        return body if body["progress"].get("epoch", 0) >= 3 else None

    running = wait_for(at_epoch_3, timeout=180, interval=0.2, what="epoch 3 on Ray")
    driver = int(running["worker"].rsplit(":", 2)[1])
    assert driver in _kiln_workers(platform.proc.pid)
    os.kill(driver, signal.SIGKILL)

    done = platform.finished(job_id, timeout=300)
    assert done["state"] == "succeeded", (done, platform.output())
    assert done["attempts"] == 2
    attempts = done["resources"]["attempts"]
    assert [a["state"] for a in attempts] == ["lost", "succeeded"]
    assert all("executor" in a for a in attempts)  # both trained on Ray
    messages = [e["message"] for e in platform.api.get(f"/jobs/{job_id}/logs").json()]
    assert any(m.startswith("resumed from the checkpoint of epoch ") for m in messages), messages
    series = platform.api.get(f"/jobs/{job_id}/metrics").json()["epochs"]
    assert [e["epoch"] for e in series] == list(range(1, epochs + 1))
    _assert_same_model(done, platform, _in_process(csv, epochs=epochs))
