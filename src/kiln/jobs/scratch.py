"""Workers' scratch space on the local disk, which a killed worker does not leak.

A job unpacks its dataset and writes its bundle in a temporary folder. A worker that is
SIGKILLed (or runs out of memory) never removes it, so every worker keeps its job
folders under ``$KILN_HOME/scratch/<pid>-<start time>/``, and a starting worker removes
the folders of workers that no longer run. A process is named by its pid *and* start
time, so a reused pid (a restarted container, say) is not taken for the dead worker.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import suppress
from pathlib import Path

import psutil

log = logging.getLogger("kiln.worker")


def _name(pid: int) -> str | None:
    try:
        return f"{pid}-{int(psutil.Process(pid).create_time() * 1000)}"
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # another user's process: it exists
        return ""


def worker_scratch(root: Path) -> Path:
    """This process's scratch folder under ``root`` (created), after removing those of
    workers that are gone."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in root.iterdir():
        pid, _, _ = folder.name.partition("-")
        if not folder.is_dir() or not pid.isdigit():
            continue
        alive = _name(int(pid))
        if alive is not None and alive in ("", folder.name):
            continue
        log.info("removing the scratch folder of a worker that is gone: %s", folder)
        shutil.rmtree(folder, ignore_errors=True)
    own = root / (_name(os.getpid()) or str(os.getpid()))
    own.mkdir(exist_ok=True)
    return own


def release(folder: Path) -> None:
    """Remove this worker's scratch folder if it is empty (another worker object in the
    same process may still use it)."""
    with suppress(OSError):
        folder.rmdir()
