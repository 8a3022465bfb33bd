"""The Ray executor: a training run handed to Ray Train (``TorchTrainer``, DDP) on a
Ray cluster, reported back as if it had run in the worker process.

The kiln worker that claimed the job stays the driver: it keeps the lease and its
heartbeats, and it alone touches the database and the artifact store. The Ray workers
train (:mod:`~kiln.jobs.executors.ray_worker`) and talk to it through a channel actor
(:mod:`~kiln.jobs.executors.ray_channel`): rank 0's epochs go to the job's callbacks
(recorded per epoch, as in-process), its checkpoints into the job's checkpoint store,
and a cancelled job stops every worker. Ray restarts a worker group that lost a worker
or a node (``KILN_RAY_MAX_FAILURES``); it resumes from the last checkpoint.

Before training, the run reserves its workers' resources in a placement group: a
cluster that cannot give them (after an autoscaler had ``KILN_RAY_RESOURCE_TIMEOUT``
seconds to add nodes) fails the job with what was asked and what the cluster has.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import DataError, KilnError, ResourcesUnavailableError, SpecError, TrainingError
from kiln.jobs.executors.ray_channel import Channel, Event
from kiln.jobs.placement import ExecutorRecord, WorkerPlacement
from kiln.train.callbacks import Callback, TrainSummary
from kiln.train.executor import FitRequest

if TYPE_CHECKING:
    from torch import nn

    from kiln.spec.train import Resources
    from kiln.train.checkpoint import CheckpointStore
    from kiln.train.loop import FitResult

POLL_SECONDS = 0.2  # how often the driver drains the channel
STOP_GRACE_SECONDS = 60.0  # a stopped run's workers get this long to stop


class RayExecutor:
    """Runs the engine on the Ray cluster at ``address`` (connects on first use)."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 600.0,
        max_failures: int = 3,
        storage: Path | None = None,
        on_record: Callable[[ExecutorRecord], None] | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.max_failures = max_failures
        self.storage = storage  # Ray Train's run folder (it keeps no kiln state there)
        self.on_record = on_record  # hears where the run is, as the workers start

    def fit(
        self,
        model: nn.Module,
        request: FitRequest,
        *,
        callbacks: Sequence[Callback],
        checkpoints: CheckpointStore | None,
        resume: bool,
    ) -> FitResult:
        """Train ``model`` on the cluster; it ends with rank 0's trained weights."""
        import ray

        resources = request.train.resources
        assert resources is not None
        connect(self.address)
        _reserve(resources, self.timeout, self.address, callbacks)
        start = checkpoints.load() if resume and checkpoints is not None else None
        if resume and start is None:
            raise TrainingError("nothing to resume: no checkpoint found", field="resume")
        channel: Any = ray.remote(num_cpus=0)(Channel).remote(start)
        run = _Run(self, resources, channel, callbacks, checkpoints)
        try:
            return run.train(model, request)
        finally:
            run.close()


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` as a driver (once per process)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)


def _reserve(
    resources: Resources, timeout: float, address: str, callbacks: Sequence[Callback]
) -> None:
    """Wait until the cluster can place every worker (checking for a cancel meanwhile);
    :class:`~kiln.errors.ResourcesUnavailableError` after ``timeout`` seconds."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker}
    bundle = {k: v for k, v in bundle.items() if v > 0}
    group = placement_group([bundle] * resources.workers, strategy="PACK")
    deadline = time.monotonic() + timeout
    try:
        while not group.wait(timeout_seconds=min(1.0, timeout)):
            for cb in callbacks:
                cb.on_batch_end()  # a cancelled job stops waiting
            if time.monotonic() >= deadline:
                raise ResourcesUnavailableError(_unavailable(resources, timeout, address, ray))
    finally:
        remove_placement_group(group)


def _unavailable(resources: Resources, timeout: float, address: str, ray: Any) -> str:
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    asked = resources.workers * resources.cpus_per_worker
    gpus = resources.workers * resources.gpus_per_worker
    return (
        f"train.resources asks for {resources.workers} workers x "
        f"{_n(resources.cpus_per_worker, 'CPU')}, {_n(resources.gpus_per_worker, 'GPU')} "
        f"({_n(asked, 'CPU')}, {_n(gpus, 'GPU')} in all); the Ray cluster at {address} has "
        f"{_n(total.get('CPU', 0), 'CPU')} and {_n(total.get('GPU', 0), 'GPU')} on "
        f"{len(nodes)} node(s), and could not place them within {timeout:g} s "
        "(KILN_RAY_RESOURCE_TIMEOUT). Ask for fewer workers or add nodes."
    )


def _n(amount: float, unit: str) -> str:
    return f"{amount:g} {unit}" + ("" if amount == 1 else "s")


class _Run:
    """One training run on the cluster: the trainer in a thread, the channel here."""

    def __init__(
        self,
        executor: RayExecutor,
        resources: Resources,
        channel: Any,
        callbacks: Sequence[Callback],
        checkpoints: CheckpointStore | None,
    ) -> None:
        import ray

        self.executor = executor
        self.resources = resources
        self.channel = channel
        self.callbacks = callbacks
        self.checkpoints = checkpoints
        self.job_id = ray.get_runtime_context().get_job_id()
        self.workers: list[WorkerPlacement] = []
        self._hellos: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.error: BaseException | None = None
        self.epochs_run = 0
        self.thread: threading.Thread | None = None

    def train(self, model: nn.Module, request: FitRequest) -> FitResult:
        thread = threading.Thread(target=self._fit, args=(model, request), daemon=True)
        self.thread = thread
        self.started = time.monotonic()
        thread.start()
        try:
            while thread.is_alive():
                thread.join(POLL_SECONDS)
                self._relay()
            self._relay()
        except BaseException as exc:
            # every worker stops at its next check; one stuck in a collective is ended by
            # its watchdog (ray_worker), and Ray's restarted group returns at once
            self.channel.stop.remote()
            thread.join(STOP_GRACE_SECONDS)
            for cb in self.callbacks:
                cb.on_train_end({"error": str(exc), "epochs_run": self.epochs_run})
            raise
        return self._result(model)

    def close(self) -> None:
        """Remove the channel once the trainer has ended (at once if it has; else when it
        does, so that its last workers still find the stop request)."""
        import ray

        def kill() -> None:
            if self.thread is not None:
                self.thread.join()
            ray.kill(self.channel)

        if self.thread is None or not self.thread.is_alive():
            kill()
        else:
            threading.Thread(target=kill, daemon=True).start()

    def _fit(self, model: nn.Module, request: FitRequest) -> None:
        """Ray Train's blocking fit (in the trainer thread); an error is kept for later."""
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from kiln.jobs.executors.ray_worker import train_worker

        res = self.resources
        per_worker = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={
                "channel": self.channel,
                "payload": [ray.put((model, request))],
                "cpus": res.cpus_per_worker,
                "gpus": res.gpus_per_worker,
            },
            scaling_config=ScalingConfig(
                num_workers=res.workers,
                use_gpu=res.gpus_per_worker > 0,
                resources_per_worker={k: v for k, v in per_worker.items() if v > 0},
            ),
            run_config=RunConfig(
                name=f"kiln-{request.run_id}-{int(time.time())}",
                storage_path=str(self.executor.storage) if self.executor.storage else None,
                failure_config=FailureConfig(max_failures=self.executor.max_failures),
            ),
        )
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised by _result in the driver's thread
            self.error = exc

    def _relay(self) -> None:
        """Drain the channel: record the workers, store checkpoints, call callbacks."""
        import ray

        events, workers, error = ray.get(self.channel.drain.remote())
        if workers != self._hellos:  # new workers (a restarted group has new pids)
            self._hellos = workers
            nodes = ray.nodes()  # type: ignore[no-untyped-call]
            ips = {n["NodeID"]: n["NodeManagerAddress"] for n in nodes}
            self.workers = [_worker(w, ips) for w in workers]
        self._record()
        for event in events:
            self._dispatch(event)
        if error is not None and self.thread is not None and self.thread.is_alive():
            raise _kiln_error(error)  # a worker failed alone: the others may wait on it

    def _dispatch(self, event: Event) -> None:
        import ray

        kind, value = event["kind"], event["value"]
        for cb in self.callbacks:
            if kind == "train_start":
                cb.on_train_start(int(value[0]), int(value[1]))
            elif kind == "epoch_start":
                cb.on_epoch_start(int(value))
            elif kind == "batches":
                for _ in range(int(value)):
                    cb.on_batch_end()
            elif kind == "tokens":
                cb.on_batch_tokens(int(value))
            elif kind == "epoch_end":
                cb.on_epoch_end(value)
        if kind == "epoch_end":
            self.epochs_run += 1
        if kind == "checkpoint" and self.checkpoints is not None:
            self.checkpoints.save(ray.get(self.channel.checkpoint.remote()))
        if kind == "train_end":
            self._ended(value)

    def _ended(self, summary: TrainSummary) -> None:
        for cb in self.callbacks:
            cb.on_train_end(summary)

    def _record(self) -> None:
        if self.executor.on_record is None or not self.workers:
            return
        seconds = time.monotonic() - self.started
        record: ExecutorRecord = {
            "kind": "ray",
            "address": self.executor.address,
            "ray_job_id": self.job_id,
            "worker_seconds": round(seconds * len(self.workers), 3),
            "workers": self.workers,
        }
        self.executor.on_record(record)

    def _result(self, model: nn.Module) -> FitResult:
        import ray

        self._record()
        outcome = ray.get(self.channel.result.remote())
        if outcome is None:
            error = ray.get(self.channel.error.remote())
            if error is not None and not isinstance(self.error, KeyboardInterrupt):
                raise _kiln_error(error)
            raise TrainingError(
                f"training on the Ray cluster failed: {_first_line(self.error)}",
                field="train.resources",
            )
        weights, result = outcome
        model.load_state_dict(weights)
        model.eval()
        return result  # type: ignore[no-any-return]


def _kiln_error(error: dict[str, Any]) -> KilnError:
    """A worker's kiln error, raised again in the driver (by its code)."""
    for cls in (SpecError, DataError, TrainingError):
        if error.get("code") == cls.code:
            return cls(str(error.get("message")), field=error.get("field"))
    return TrainingError(str(error.get("message")), field=error.get("field"))


def _worker(w: dict[str, Any], ips: dict[str, str]) -> WorkerPlacement:
    """A worker's hello as recorded, with its node's address as the cluster knows it."""
    return {
        "rank": int(w["rank"]),
        "node_id": str(w["node_id"]),
        "node_ip": ips.get(str(w["node_id"]), "?"),
        "pid": int(w["pid"]),
        "cpus": float(w["cpus"]),
        "gpus": float(w["gpus"]),
    }


def _first_line(exc: BaseException | None) -> str:
    if exc is None:
        return "no result came back"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
