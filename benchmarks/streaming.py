"""Streaming training on a Parquet table larger than the memory it may use.

Writes ``--gb`` GB of Parquet (random float64 features, a linearly separable label)
into ``--dir`` (reused when it already holds that table), then trains one epoch of a
``data.streaming`` spec in a child process and prints the data's size on disk and in
memory (as a float64 frame), rows per second, wall time and the child's peak RSS.

The memory budget (``--memory``, default 1G) is enforced with a cgroup: a cgroup v1
memory group of its own where ``/sys/fs/cgroup/memory`` is writable (as root), else
``systemd-run --scope -p MemoryMax=...`` where systemd runs; elsewhere it is only
reported against (``RLIMIT_AS`` cannot be used: torch reserves far more address space
than it touches). Past the budget the kernel kills the child, and the run fails.

    python benchmarks/streaming.py --gb 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

FEATURES = 32
ROWS_PER_FILE = 500_000  # ~130 MB per file
ROW_GROUP = 100_000
BYTES_PER_ROW = (FEATURES + 1) * 8  # float64 features and label

CHILD = """
import json, sys, time
import kiln
spec = json.loads(sys.argv[1])
started = time.perf_counter()
bundle = kiln.fit(spec)
seconds = time.perf_counter() - started
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
split = bundle.meta.lineage.split
print(json.dumps({"seconds": seconds, "peak": peak, "train": split.train,
                  "rows": bundle.meta.lineage.data.rows_read,
                  "accuracy": bundle.metrics["test"]["accuracy"]}))
"""


def write_table(root: Path, rows: int) -> None:
    """``rows`` rows in files of :data:`ROWS_PER_FILE`, written one file at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = root / "_ROWS"
    if marker.exists() and int(marker.read_text()) == rows:
        return  # reuse the table of an earlier run
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weights = rng.normal(size=FEATURES)
    for i, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        x = rng.normal(size=(n, FEATURES))
        columns = {f"f{j}": x[:, j] for j in range(FEATURES)}
        columns["y"] = (x @ weights + rng.normal(0, 0.5, n) > 0).astype(np.float64)
        pq.write_table(pa.table(columns), root / f"part-{i:04d}.parquet", row_group_size=ROW_GROUP)
    marker.write_text(str(rows))


CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _bytes(memory: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    suffix = memory[-1].upper()
    return int(float(memory[:-1]) * units[suffix]) if suffix in units else int(memory)


def limited(command: list[str], memory: str) -> tuple[list[str], bool]:
    """``command`` under a cgroup memory cap: a v1 memory cgroup, else systemd's."""
    group = CGROUP_V1 / "kiln-bench-streaming"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(_bytes(memory)))
        with_swap = group / "memory.memsw.limit_in_bytes"
        if with_swap.exists():  # no swapping past the budget either
            with_swap.write_text(str(_bytes(memory)))
        enter = f'echo $$ > {group}/cgroup.procs && exec "$@"'
        return ["sh", "-c", enter, "sh", *command], True
    except OSError:
        pass
    probe = ["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={memory}", "true"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        return command, False
    return [*probe[:-1], *command], True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0, help="table size on disk (GB)")
    parser.add_argument("--dir", type=Path, default=None, help="where the table is written")
    parser.add_argument("--memory", default="1G", help="the child's memory budget")
    parser.add_argument("--model", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()

    rows = int(args.gb * 1e9 / BYTES_PER_ROW)
    root = args.dir or Path(f"/tmp/kiln-streaming-{args.gb:g}gb")
    t0 = time.perf_counter()
    write_table(root, rows)
    written = time.perf_counter() - t0
    on_disk = sum(p.stat().st_size for p in root.glob("*.parquet"))
    model = {"type": "linear"} if args.model == "linear" else {"type": "mlp", "hidden": [64]}
    spec = {
        "name": "streaming-bench",
        "task": "classification",
        "data": {
            "source": str(root),
            "target": "y",
            "streaming": True,
            "split": {"test": 0.01, "val": 0.01},
        },
        "model": model,
        "train": {
            "epochs": 1,
            "batch_size": args.batch_size,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
        },
    }
    command, capped = limited([sys.executable, "-c", CHILD, json.dumps(spec)], args.memory)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"training failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"table        {rows:,} rows x {FEATURES + 1} float64 columns in {root}")
    print(f"on disk      {on_disk / gib:.2f} GiB (written in {written:.0f} s; reused if 0)")
    print(f"in memory    {rows * BYTES_PER_ROW / gib:.2f} GiB as a float64 frame")
    cap = "enforced (cgroup)" if capped else "not enforced here (no systemd): measured only"
    print(f"budget       {args.memory} {cap}")
    print(f"wall         {result['seconds']:.1f} s: fit pass + 1 epoch + test pass")
    print(f"throughput   {result['rows'] / result['seconds']:,.0f} rows/s over the table")
    print(f"peak RSS     {result['peak'] / gib:.2f} GiB (VmHWM of the training process)")
    print(f"accuracy     {result['accuracy']:.3f} on the test split")


if __name__ == "__main__":
    main()
