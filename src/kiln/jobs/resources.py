"""What a job's attempts cost: wall time, CPU time, peak memory, and the compute it is billed.

A :class:`ResourceMeter` measures one attempt inside the worker process that runs it.
``Job.resources`` keeps every attempt and the job's totals::

    {"wall_seconds": 12.4, "cpu_seconds": 11.9,    # sums over the attempts
     "peak_rss_bytes": 310_000_000,                # the largest peak of any attempt
     "gpu_peak_bytes": 0,                          # only once an attempt used CUDA
     "device": "cpu",                              # the last attempt's
     "attempts": [{"attempt": 1, "state": "succeeded", "wall_seconds": ..., ...}]}

An attempt's ``state`` is ``running`` while it runs (the worker's heartbeat rewrites
the entry, so a live job shows its figures), then how it ended: ``succeeded``,
``failed``, ``cancelled``, ``released`` (worker shutdown; the job resumes later) or
``lost`` (its worker went silent: the figures are those of its last heartbeat).
Leaving ``running`` is what meters the attempt: one ``compute_seconds`` usage event of
its wall seconds, by device, in the same transaction, so no attempt is billed twice.
An attempt that trained on a Ray cluster also holds an ``executor`` record (where its
workers ran, :mod:`kiln.jobs.placement`) and is metered its ``worker_seconds`` too.

Measurements are of the worker process: CPU seconds are ``time.process_time`` (every
thread of it: torch's intra-op threads, the heartbeat; in a test that runs the API and
a worker in one process, the server's work too). The peak resident memory is the
kernel's high-water mark (``VmHWM``), reset when the attempt starts, on Linux; where it
cannot be reset, the largest ``VmRSS`` seen at the heartbeats and at the end; without
``/proc``, ``ru_maxrss`` (the process's lifetime peak). GPU memory is torch's peak
allocation on the current CUDA device, reset when the attempt starts.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any, NotRequired

from sqlalchemy import select
from sqlalchemy.orm import Session

# typing_extensions' TypedDict: pydantic (the API's JobOut) reads it on Python 3.11
from typing_extensions import TypedDict

from kiln.jobs.placement import ExecutorRecord
from kiln.jobs.queue import Lease
from kiln.lifecycle import JobState
from kiln.monitor import usage
from kiln.store.tables import Job

RUNNING = "running"
LOST = "lost"
RELEASED = "released"
STATUS = "/proc/self/status"


class Figures(TypedDict):
    """What :meth:`ResourceMeter.snapshot` measured of one attempt so far."""

    wall_seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    gpu_peak_bytes: NotRequired[int]  # only once the attempt used CUDA
    device: str  # "cpu", "cuda", "mps"
    executor: NotRequired[ExecutorRecord]  # trained on a Ray cluster


class Attempt(TypedDict):
    """One entry of ``Job.resources["attempts"]``: the attempt's number and its state
    (``running`` or how it ended), then its :class:`Figures` (keys in stored order)."""

    attempt: int
    state: str
    wall_seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    gpu_peak_bytes: NotRequired[int]
    device: str
    executor: NotRequired[ExecutorRecord]


class Resources(TypedDict, total=False):
    """``Job.resources``: the attempts' totals, and every attempt (module docstring)."""

    wall_seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    gpu_peak_bytes: int
    device: str
    executor: ExecutorRecord  # the latest attempt's, when it trained on a Ray cluster
    attempts: list[Attempt]


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` line of /proc/self/status in bytes; None off Linux."""
    try:
        with open(STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux 4.0+); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # 5: reset VmHWM only (1-4 clear page bits)
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def _max_rss_bytes() -> int:
    """The process's lifetime peak RSS, where /proc is missing (macOS: bytes, else KiB)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _cuda() -> Any:
    """``torch.cuda`` if this process has already initialised CUDA, else None.

    Never imports torch nor initialises CUDA itself: an attempt that uses no GPU
    costs no CUDA context.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_initialized() else None
    except Exception:  # a broken driver reads as no GPU
        return None


def device_type(device: str | None) -> str | None:
    """``cuda:0`` → ``cuda``; None stays None."""
    return device.split(":", 1)[0] if device else None


class ResourceMeter:
    """Measures one attempt, from its construction, in this process. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wall0 = time.perf_counter()
        self._cpu0 = time.process_time()
        self._hwm = _reset_peak_rss()
        self._peak_rss = _proc_status_bytes("VmRSS") or 0
        cuda = _cuda()
        if cuda is not None:
            # if it fails, the peak runs from the process's first allocation
            with contextlib.suppress(Exception):
                cuda.reset_peak_memory_stats()
        self.device: str | None = None
        """The device the job reported (a trained bundle's ``training.device``)."""
        self._executor: ExecutorRecord | None = None

    def set_executor(self, record: ExecutorRecord) -> None:
        """Where the attempt's training runs (the Ray executor, as its workers report)."""
        with self._lock:
            self._executor = record

    def sample(self) -> None:
        """Note the current resident memory (called at every heartbeat and at the end)."""
        rss = _proc_status_bytes("VmHWM" if self._hwm else "VmRSS")
        with self._lock:
            self._peak_rss = max(self._peak_rss, rss or 0)

    def snapshot(self) -> Figures:
        """The figures so far: wall/CPU seconds, peak RSS, GPU peak (if CUDA ran), device."""
        self.sample()
        with self._lock:
            peak = self._peak_rss
        if not peak:  # no /proc: the lifetime peak is the best there is
            peak = _max_rss_bytes()
        wall = round(time.perf_counter() - self._wall0, 3)
        cpu = round(time.process_time() - self._cpu0, 3)
        gpu = _gpu_peak()
        device = device_type(self.device) or ("cuda" if gpu else "cpu")
        figures: Figures = (
            {  # the GPU figure only where a GPU was used; keys in their stored order
                "wall_seconds": wall,
                "cpu_seconds": cpu,
                "peak_rss_bytes": int(peak),
                "gpu_peak_bytes": gpu,
                "device": device,
            }
            if device == "cuda" or gpu
            else {
                "wall_seconds": wall,
                "cpu_seconds": cpu,
                "peak_rss_bytes": int(peak),
                "device": device,
            }
        )
        with self._lock:
            if self._executor is not None:
                figures["executor"] = self._executor
        return figures


def _gpu_peak() -> int:
    """torch's peak CUDA allocation since the attempt started; 0 without CUDA."""
    cuda = _cuda()
    if cuda is None:
        return 0
    try:
        return int(cuda.max_memory_allocated())
    except Exception:
        return 0


# --- Job.resources --------------------------------------------------------------------


def _totals(attempts: list[Attempt]) -> Resources:
    out: Resources = {
        "wall_seconds": round(sum(a.get("wall_seconds", 0.0) for a in attempts), 3),
        "cpu_seconds": round(sum(a.get("cpu_seconds", 0.0) for a in attempts), 3),
        "peak_rss_bytes": max((a.get("peak_rss_bytes", 0) for a in attempts), default=0),
    }
    gpu = [a["gpu_peak_bytes"] for a in attempts if "gpu_peak_bytes" in a]
    if gpu:
        out["gpu_peak_bytes"] = max(gpu)
    if attempts:
        out["device"] = attempts[-1].get("device", "cpu")
        if "executor" in attempts[-1]:
            out["executor"] = attempts[-1]["executor"]
    return {**out, "attempts": attempts}


def _stored_attempts(job: Job) -> list[Attempt]:
    """Copies of the job's recorded attempts (the caller changes them)."""
    stored: list[Attempt] = (job.resources or {}).get("attempts", [])
    return [a.copy() for a in stored]


def _meter(session: Session, job: Job, entry: Attempt) -> None:
    device = str(entry.get("device") or "cpu")
    usage.record(
        session,
        job.project_id,
        "compute_seconds",
        float(entry.get("wall_seconds", 0.0)),
        device=device,
        subject=job.id,
    )
    executor = entry.get("executor")
    if executor is not None:  # the Ray workers' time, beside the driver's
        gpus = any(w["gpus"] > 0 for w in executor["workers"])
        usage.record(
            session,
            job.project_id,
            "worker_seconds",
            float(executor["worker_seconds"]),
            device="cuda" if gpus else "cpu",
            subject=job.id,
        )


def _settle(session: Session, job: Job, attempts: list[Attempt]) -> bool:
    """Mark (and meter) the ``running`` entries of attempts that are not running any more."""
    live = job.attempts if job.state == JobState.running else None
    changed = False
    for entry in attempts:
        if entry.get("state") == RUNNING and entry.get("attempt") != live:
            entry["state"] = LOST
            _meter(session, job, entry)
            changed = True
    return changed


def _locked(session: Session, *where: Any) -> Job | None:
    # FOR UPDATE on PostgreSQL; on SQLite, BEGIN IMMEDIATE already serialises writers
    return session.scalar(select(Job).where(*where).with_for_update())


def account(session: Session, lease: Lease, figures: Figures, state: str) -> bool:
    """Write this attempt's figures into ``Job.resources``, in the caller's transaction.

    ``state`` is ``running`` (a heartbeat: nothing is metered) or how the attempt ended
    (its compute seconds are metered). Only while the lease is held; False otherwise.
    """
    job = _locked(
        session,
        Job.id == lease.job_id,
        Job.worker_id == lease.worker_id,
        Job.attempts == lease.attempt,
        Job.state == JobState.running,
    )
    if job is None:
        return False
    attempts = _stored_attempts(job)
    _settle(session, job, attempts)
    entry: Attempt = {"attempt": lease.attempt, "state": state, **figures}
    attempts = [a for a in attempts if a.get("attempt") != lease.attempt] + [entry]
    attempts.sort(key=lambda a: int(a.get("attempt", 0)))
    if state != RUNNING:
        _meter(session, job, entry)
    job.resources = dict(_totals(attempts))
    return True


def settle_lost(session: Session, job_id: str) -> None:
    """Meter the attempts of a job whose worker went silent (after ``Queue.recover``)."""
    job = _locked(session, Job.id == job_id)
    if job is None:
        return
    attempts = _stored_attempts(job)
    if _settle(session, job, attempts):
        job.resources = dict(_totals(attempts))
