"""A worker process: claim a job, run it with a heartbeat, repeat.

While a job runs, a background thread renews the lease every
``KILN_HEARTBEAT_SECONDS``, watches for a cancel request and writes the attempt's
resources so far (wall and CPU seconds, peak memory) to the job; the worker also
re-queues jobs of workers that went silent (any live worker recovers any dead one's
job) and bills their lost attempts' compute up to the last heartbeat. Jobs' temporary
folders live in the worker's scratch folder (:mod:`kiln.jobs.scratch`). SIGTERM or
Ctrl-C drains: the running job finishes, no new one is taken; a second signal stops
the running job at the next batch and puts it back in the queue, to resume from its
last checkpoint.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from types import FrameType

from kiln.jobs.context import JobContext
from kiln.jobs.queue import LeaseLost, Queue
from kiln.jobs.resources import RUNNING, account, settle_lost
from kiln.jobs.runner import run
from kiln.jobs.scratch import release, worker_scratch
from kiln.settings import Settings, apply_threads
from kiln.store.artifacts import ArtifactStore
from kiln.store.crypto import open_artifacts
from kiln.store.db import Database
from kiln.train.executor import Executor

log = logging.getLogger("kiln.worker")


class Worker:
    """Runs jobs from the queue, one at a time."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database | None = None,
        store: ArtifactStore | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.db = db or Database(settings.resolved_database_url)
        # encrypted with the platform's data keys; a wrong master key fails here
        self.store = store or open_artifacts(settings, self.db)
        self.queue = Queue(self.db, heartbeat_timeout=settings.heartbeat_timeout)
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        # jobs' temporary folders; those of killed workers are removed here
        self.scratch = worker_scratch(settings.home_dir / "scratch")
        self.draining = threading.Event()
        self.current: JobContext | None = None
        self._last_recover = 0.0

    def run_once(self) -> bool:
        """Recover stale jobs if due, then run one queued job; False if there was none."""
        now = time.monotonic()
        if now - self._last_recover >= self.settings.heartbeat_seconds:
            self._last_recover = now
            self._recover()
        claimed = self.queue.claim(self.id)
        if claimed is None:
            return False
        lease, job = claimed
        self.scratch.mkdir(parents=True, exist_ok=True)  # released when a run() ended
        ctx = JobContext(
            db=self.db, store=self.store, queue=self.queue, lease=lease, scratch=self.scratch
        )
        ctx.executor = self._executor(ctx)
        self.current = ctx
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(ctx, done), daemon=True)
        beat.start()
        started = time.perf_counter()
        log.info("%s: %s %s attempt %d started", self.id, job.kind, job.id, lease.attempt)
        try:
            state = run(ctx, job)
        finally:
            done.set()
            beat.join()
            self.current = None
        outcome = state.value if state is not None else f"stopped ({ctx.reason})"
        log.info("%s: %s %s in %.1f s", self.id, job.id, outcome, time.perf_counter() - started)
        return True

    def _executor(self, ctx: JobContext) -> Executor | None:
        """The Ray cluster for the job's train.resources runs (None: in-process)."""
        address = self.settings.ray_address
        if not address:
            return None
        from kiln.jobs.executors.ray import RayExecutor

        return RayExecutor(
            address,
            timeout=self.settings.ray_resource_timeout,
            max_failures=self.settings.ray_max_failures,
            storage=self.scratch / "ray",
            on_record=ctx.meter.set_executor,
        )

    def _recover(self) -> None:
        """Re-queue (or end) the jobs of silent workers and bill their lost attempts."""
        requeued, ended = self.queue.recover()
        for job_id in requeued:
            log.warning("%s: re-queued %s (its worker went silent)", self.id, job_id)
        for job_id in ended:
            log.warning("%s: %s ended (its worker went silent)", self.id, job_id)
        for job_id in requeued + ended:
            with self.db.session() as session:
                settle_lost(session, job_id)

    def run(self, *, until_idle: bool = False, parent: int | None = None) -> None:
        """Work until drained (or, with ``until_idle``, until the queue is empty).

        With ``parent``, drain once that process is gone (``kiln up`` was killed).
        """
        apply_threads(self.settings)
        # torch and the training code take seconds to import: do it while waiting,
        # not between claiming the first job and starting it
        threading.Thread(target=_preload, daemon=True).start()
        log.info("%s: waiting for jobs", self.id)
        if parent is not None:
            threading.Thread(target=self._watch_parent, args=(parent,), daemon=True).start()
        try:
            while not self.draining.is_set():
                if not self.run_once():
                    if until_idle:
                        return
                    self.draining.wait(self.settings.poll_seconds)
            log.info("%s: drained, exiting", self.id)
        finally:
            release(self.scratch)

    def _heartbeat(self, ctx: JobContext, done: threading.Event) -> None:
        while not done.wait(self.settings.heartbeat_seconds):
            try:
                if self.queue.heartbeat(ctx.lease):
                    ctx.request_stop("cancelled")
                with self.db.session() as session:
                    account(session, ctx.lease, ctx.meter.snapshot(), RUNNING)
            except LeaseLost:
                log.warning("%s: lost the lease on %s", self.id, ctx.lease.job_id)
                ctx.request_stop("lease_lost")
            except Exception as exc:  # the database blinked; the next beat tries again
                log.warning("%s: heartbeat failed: %s", self.id, exc)

    def _watch_parent(self, parent: int) -> None:
        while not self.draining.wait(1.0):
            if os.getppid() != parent:
                log.warning("%s: kiln up is gone; draining", self.id)
                self.draining.set()

    def handle_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.draining.is_set():
            log.warning("%s: draining (the running job finishes; signal again to stop it)", self.id)
            self.draining.set()
        elif self.current is not None:
            log.warning("%s: stopping the running job; it resumes later", self.id)
            self.current.request_stop("shutdown")

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.handle_signal)
        signal.signal(signal.SIGINT, self.handle_signal)


def _preload() -> None:
    import kiln.workflow  # noqa: F401


def main(settings: Settings | None = None, *, parent: int | None = None) -> None:
    """Run one worker until signalled (``kiln worker``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    worker = Worker(settings or Settings())
    worker.install_signal_handlers()
    worker.run(parent=parent)
    worker.db.dispose()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="A kiln worker (started by kiln up).")
    parser.add_argument("--parent", type=int, default=None, help="drain when this pid is gone")
    main(parent=parser.parse_args().parent)
