"""Measurements of a bundle on this machine: size, latency, throughput, peak memory.

Latency is measured through the bundle's own backend after a warm-up, with the
backend's threads pinned (torch intra-op threads / onnxruntime intra-op threads), as
the p50 and p95 of at least ``runs`` single calls at batch 1 and at batch 32 (inputs
already encoded: this is the model's time, not preprocessing's). Peak memory is the
peak RSS of a fresh process that loads the bundle and predicts one batch of 32.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from kiln.bundle import Bundle
from kiln.compress.report import Latency, Machine
from kiln.runtime import Backend
from kiln.runtime.placement import gpu_name
from kiln.runtime.select import recorded_backend

WARMUP = 10


def latency(
    bundle: Bundle, sample: np.ndarray, runs: int = 50, threads: int | None = None
) -> Latency:
    """p50/p95 latency (ms) at batch 1 and 32 and throughput (rows/s) at batch 32, with
    ``threads`` (default: every core) pinned for torch and onnxruntime alike."""
    threads = threads or os.cpu_count() or 1
    backend = _pinned_backend(bundle, threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p50_1, p95_1 = _percentiles(backend, sample, 1, runs)
        p50_32, p95_32 = _percentiles(backend, sample, 32, runs)
    finally:
        torch.set_num_threads(before)
    return {
        "threads": threads,
        "runs": runs,
        "batch1_p50_ms": p50_1,
        "batch1_p95_ms": p95_1,
        "batch32_p50_ms": p50_32,
        "batch32_p95_ms": p95_32,
        "throughput_rows_per_s": 32 / (p50_32 / 1e3),
    }


def _percentiles(
    backend: Backend, sample: np.ndarray, batch: int, runs: int
) -> tuple[float, float]:
    """p50 and p95 (ms) of at least 30 timed calls at ``batch`` rows, after a warm-up."""
    x = np.ascontiguousarray(np.resize(sample, (batch, *sample.shape[1:])))
    for _ in range(WARMUP):
        backend.forward(x)
    times = []
    for _ in range(max(runs, 30)):
        t0 = time.perf_counter()
        backend.forward(x)
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def _pinned_backend(bundle: Bundle, threads: int) -> Backend:
    """The bundle's backend with onnxruntime's pool pinned to ``threads`` (torch's is
    pinned around the timed calls)."""
    if bundle.meta.runtime.backend == "onnxruntime":
        return recorded_backend(bundle.model, bundle.meta.runtime, bundle.onnx, threads=threads)
    return bundle.backend


def peak_memory(directory: Path) -> int | None:
    """Peak RSS in bytes of a fresh process that loads ``directory`` and predicts 32 rows."""
    code = (
        "import resource, sys, numpy as np, kiln\n"
        "b = kiln.load(sys.argv[1])\n"
        "x = b.example_input().numpy()\n"
        "b.backend.forward(np.ascontiguousarray(np.repeat(x, 32, axis=0)))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(  # noqa: S603 - our own interpreter and a fixed script
            [sys.executable, "-c", code, str(directory)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=True,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return int(done.stdout.strip().splitlines()[-1]) * 1024  # Linux reports KiB


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def machine() -> Machine:
    """What the figures were measured on: CPU model and SIMD flags, cores, versions."""
    model = platform.processor() or platform.machine()
    flags: list[str] = []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine()):
                model = value.strip()
            if key.strip() == "flags" and not flags:
                wanted = ("avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma")
                flags = [f for f in value.split() if f in wanted]
    versions = {}
    for name in ("torch", "onnxruntime", "numpy", "modelkiln"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": model,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "cuda": gpu_name(),
    }


def to_json(data: Mapping[str, object]) -> str:
    return json.dumps(data, indent=2)
