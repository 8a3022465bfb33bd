"""Scratch space on the local disk, which a killed worker or API process does not leak.

A job unpacks its dataset and writes its bundle in a temporary folder; the API writes
an upload there while it checks it. A process that is SIGKILLed (or runs out of memory)
never removes it, so every worker and API process keeps its temporary folders under
``$KILN_HOME/scratch/<pid>-<start time>/``, and a starting one removes the folders of
processes that no longer run. A process is named by its pid *and* start
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


def own_scratch(root: Path) -> Path:
    """This process's scratch folder under ``root`` (created if missing; nothing removed)."""
    own = root / (_name(os.getpid()) or str(os.getpid()))
    own.mkdir(parents=True, exist_ok=True)
    return own


def worker_scratch(root: Path) -> Path:
    """This process's scratch folder under ``root`` (created), after removing those of
    processes that are gone."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in root.iterdir():
        pid, _, _ = folder.name.partition("-")
        if not folder.is_dir() or not pid.isdigit():
            continue
        alive = _name(int(pid))
        if alive is not None and alive in ("", folder.name):
            continue
        log.info("removing the scratch folder of a process that is gone: %s", folder)
        shutil.rmtree(folder, ignore_errors=True)
    return own_scratch(root)


def release(folder: Path) -> None:
    """Remove this worker's scratch folder if it is empty (another worker object in the
    same process may still use it)."""
    with suppress(OSError):
        folder.rmdir()
