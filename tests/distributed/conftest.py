"""A real Ray cluster on loopback for the ``distributed`` tests: one head node started
with ``ray start --head`` (2 CPUs) for each test module, stopped at its end.

Ray's own temporary folder goes under a short path of the session's (its socket paths
must stay under the kernel's 108 bytes).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import free_port, kiln_env

CPUS = 2


def _ray_cli() -> list[str]:
    return [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a Ray head with 2 CPUs, shared by the tests of a module (and
    stopped after them: later modules, the README's walk-through, start their own)."""
    pytest.importorskip("ray")
    temp = Path(tempfile.mkdtemp(prefix="kray-", dir="/tmp"))
    port = free_port()
    env = kiln_env(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    started = subprocess.run(
        [
            *_ray_cli(),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--num-cpus={CPUS}",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    address = f"127.0.0.1:{port}"
    try:
        yield address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([*_ray_cli(), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
