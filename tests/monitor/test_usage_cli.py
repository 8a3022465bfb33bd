"""``kiln usage`` and ``kiln quotas`` against a live server, and the client behind them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.live_server import Platform, running_platform
from kiln.cli.jobs_cmds import resources_line
from kiln.cli.main import app
from kiln.cli.usage_cmds import amount, parse_amount
from kiln.client import Client
from kiln.errors import ForbiddenError, QuotaError, SpecError

runner = CliRunner()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with running_platform(tmp_path_factory.mktemp("home"), worker=False) as platform:
        yield platform


def kiln(live: Platform, *args: str, key: str | None = None) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "--url", live.url, "--api-key", key or live.admin_key])
    return result.exit_code, result.output


def test_quotas_and_usage_from_the_command_line(live: Platform, tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("x,y\n1,a\n2,b\n3,a\n")
    with Client(live.url, live.admin_key) as client:
        client.projects.create("cli")
        reader = client.keys.create(["read", "train"], project="cli")["key"]

    code, out = kiln(live, "quotas", "set", "stored_bytes", "1KiB", "--period", "total",
                     "--project", "cli", "--json")  # fmt: skip
    assert code == 0, out
    assert json.loads(out) == {
        "project": "cli", "kind": "stored_bytes", "period": "total", "limit": 1024.0, "used": 0.0
    }  # fmt: skip
    code, out = kiln(live, "quotas", "set", "compute_seconds", "2h", "--project", "cli")
    assert code == 0 and "compute_seconds limited to 2.0 h per day" in out, out

    with Client(live.url, reader) as client:
        row = client.datasets.upload(table)
        assert row["size_bytes"] == table.stat().st_size
        big = tmp_path / "big.csv"
        big.write_text("x,y\n" + "1,a\n" * 400)
        with pytest.raises(QuotaError, match="stored_bytes in total is 1024"):
            client.datasets.upload(big)
        with pytest.raises(ForbiddenError):
            client.quotas.set("stored_bytes", None, period="total")
        assert [q["kind"] for q in client.quotas.list()] == ["compute_seconds", "stored_bytes"]
        doc = client.usage(group_by="month")

    code, out = kiln(live, "usage", "--json", key=reader)
    assert code == 0, out
    day = json.loads(out)
    assert day["project"] == "cli" and day["group_by"] == "day"
    assert day["totals"] == doc["totals"] == {"stored_bytes": table.stat().st_size}
    assert [i["kind"] for i in day["items"]] == ["stored_bytes"]
    assert [q["limit"] for q in day["quotas"]] == [7200.0, 1024.0]

    code, out = kiln(live, "usage", "--group-by", "total", "--from", "2020-01-01", key=reader)
    assert code == 0, out
    assert f"total stored_bytes: {table.stat().st_size} B" in out
    assert "quota stored_bytes in total: " in out and "of 1.0 KiB used" in out
    code, out = kiln(live, "usage", "--from", "soon", key=reader)
    assert code == SpecError.exit_code and "from" in out

    code, out = kiln(live, "quotas", "list", key=reader)
    assert code == 0 and "compute_seconds" in out and "2.0 h" in out, out
    code, out = kiln(live, "quotas", "remove", "compute_seconds", "--project", "cli")
    assert code == 0 and "no compute_seconds quota per day" in out, out
    code, out = kiln(live, "quotas", "list", "--json", key=reader)
    assert [q["kind"] for q in json.loads(out)] == ["stored_bytes"]
    code, out = kiln(live, "quotas", "set", "stored_bytes", "lots", "--project", "cli")
    assert code == SpecError.exit_code and "limit" in out


def test_amounts_read_and_print_in_their_units() -> None:
    assert parse_amount("90min") == 5400 and parse_amount("1.5GiB") == 1.5 * (1 << 30)
    assert parse_amount(" 500 MB ") == 5e8 and parse_amount("3600") == 3600
    assert (amount("compute_seconds", 12.34), amount("stored_bytes", 3 << 20)) == (
        "12.3 s",
        "3.0 MiB",
    )
    assert amount("prediction_rows", 1234.0) == "1,234" and amount("stored_bytes", None) == "-"
    line = resources_line(
        {
            "wall_seconds": 12.5,
            "cpu_seconds": 10.0,
            "peak_rss_bytes": 300 << 20,
            "gpu_peak_bytes": 1 << 30,
            "device": "cuda",
            "attempts": [{}, {}],
        }
    )
    assert line == (
        "resources: 12.5 s wall, 10.0 s CPU, peak memory 300.0 MiB, GPU peak 1.0 GiB "
        "on cuda (2 attempts)"
    )


HELP_PROBE = """
import json, sys
from typer.testing import CliRunner
from kiln.cli.main import app
for args in (["--help"], ["usage", "--help"], ["quotas", "set", "--help"]):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
heavy = ("torch", "fastapi", "sqlalchemy", "httpx", "numpy", "pandas")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def test_the_help_of_usage_and_quotas_imports_nothing_heavy() -> None:
    out = subprocess.run(
        [sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


RAY = {
    "kind": "ray",
    "address": "ray://ray-head:10001",
    "ray_job_id": "03000000",
    "worker_seconds": 150.0,
    "workers": [
        {"rank": 0, "node_id": "a1", "node_ip": "10.0.0.5", "pid": 4242, "cpus": 1.0, "gpus": 0.0},
        {"rank": 1, "node_id": "b2", "node_ip": "10.0.0.6", "pid": 5150, "cpus": 2.0, "gpus": 1.0},
        {"rank": 2, "node_id": "b2", "node_ip": "10.0.0.6", "pid": 5151, "cpus": 2.0, "gpus": 0.5},
    ],
}


def test_worker_seconds_is_a_usage_kind_in_seconds() -> None:
    from kiln.monitor.usage import KINDS, QUOTA_KINDS

    assert "worker_seconds" in KINDS and "worker_seconds" in QUOTA_KINDS
    assert amount("worker_seconds", 5400.0) == "90.0 min"
    assert amount("worker_seconds", 9.0 * 3600) == "9.0 h"


def test_jobs_show_says_where_a_job_trained_on_ray(live: Platform) -> None:
    from sqlalchemy import select

    from kiln.jobs import queue
    from kiln.lifecycle import JobState
    from kiln.store.tables import Project

    figures = {"wall_seconds": 40.0, "cpu_seconds": 4.0, "peak_rss_bytes": 1 << 20}
    with live.services.db.session() as s:
        project = s.scalar(select(Project).where(Project.name == "default"))
        assert project is not None
        job = queue.new_job(s, project, "train", {"name": "wine"}, max_attempts=1)
        job.state, job.attempts = JobState.succeeded, 1
        attempt = {"attempt": 1, "state": "succeeded", **figures, "device": "cpu", "executor": RAY}
        job.resources = {**figures, "device": "cpu", "executor": RAY, "attempts": [attempt]}
        job_id = job.id

    code, out = kiln(live, "jobs", "show", job_id)
    assert code == 0, out
    lines = out.splitlines()
    at = lines.index(
        "ran on Ray ray://ray-head:10001, Ray job 03000000, 3 workers on 2 nodes, "
        "2.5 min worker time"
    )
    assert lines[at - 1].startswith("resources: 40.0 s wall, 4.0 s CPU")
    assert lines[at + 1 : at + 4] == [
        "  worker 0: node 10.0.0.5, pid 4242, 1 CPU, 0 GPUs",
        "  worker 1: node 10.0.0.6, pid 5150, 2 CPUs, 1 GPU",
        "  worker 2: node 10.0.0.6, pid 5151, 2 CPUs, 0.50 GPUs",
    ]
    code, out = kiln(live, "jobs", "show", job_id, "--json")
    assert code == 0 and json.loads(out)["resources"]["executor"] == RAY
