"""Workers' scratch folders: a starting worker removes those of workers that are gone
(a SIGKILLed worker never cleans up after itself), and only those."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from kiln.jobs.scratch import release, worker_scratch


def started_at(pid: int) -> int:
    return int(psutil.Process(pid).create_time() * 1000)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_folders_of_gone_workers_are_removed_and_live_ones_kept(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    root = tmp_path / "scratch"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folders = {
        "dead": root / f"{gone.pid}-{started_at(os.getpid())}",
        "live": root / f"{sleeper.pid}-{started_at(sleeper.pid)}",
        # the live process's pid, but another start time: a pid reused after the worker died
        "reused": root / f"{sleeper.pid}-{started_at(sleeper.pid) - 60_000}",
    }
    for folder in folders.values():
        (folder / "kiln-job_x-abc" / "data").mkdir(parents=True)
        (folder / "kiln-job_x-abc" / "data" / "rows.csv").write_text("a\n1\n")
    (root / "notes.txt").write_text("not a worker's")
    (root / "cache").mkdir()

    own = worker_scratch(root)

    assert own == root / f"{os.getpid()}-{started_at(os.getpid())}" and own.is_dir()
    assert not folders["dead"].exists()
    assert not folders["reused"].exists()
    assert (folders["live"] / "kiln-job_x-abc" / "data" / "rows.csv").is_file()
    assert (root / "notes.txt").is_file() and (root / "cache").is_dir()
    # a second worker object in the same process shares the folder, keeping its jobs'
    (own / "kiln-job_y-def").mkdir()
    assert worker_scratch(root) == own and (own / "kiln-job_y-def").is_dir()


def test_release_removes_only_an_empty_folder(tmp_path: Path) -> None:
    own = worker_scratch(tmp_path)
    (own / "kiln-job_y-def").mkdir()
    release(own)
    assert own.is_dir()  # another worker object in this process is still using it
    (own / "kiln-job_y-def").rmdir()
    release(own)
    assert not own.exists()
    release(own)  # already gone: nothing to do
