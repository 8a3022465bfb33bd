"""Library predict latency end to end: ``kiln.load(path).predict(rows)`` for the digits MLP.

    .venv/bin/python benchmarks/predict_latency.py [--calls 2000] [--epochs 10] [--threads N]

Trains the digits MLP (64 numeric columns, as in benchmarks/compression.py, fewer
epochs), makes a torch int8 and an onnxruntime int8 variant with ``kiln compress``,
then times ``predict`` on one row (a dict of 64 columns) and on 256 rows (a list of
dicts), each through a freshly loaded bundle after a warm-up: the median and p90 of
``--calls`` calls, and each int8 variant's speed against its fp32 parent. This is the
whole library path (input checks, preprocessing, forward, decoding), not the model's
forward alone. ``--threads`` pins torch's intra-op threads (default: torch's own
choice, one per core; on a busy machine a pool of several threads can wait far longer
for its cores than a 256-row forward takes). Targets (issue #12): one-row fp32
<= 0.3 ms; an int8 variant measurably faster end to end than fp32.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kiln
from kiln.compress.pipeline import compress
from kiln.data.sources import read_table

DIGITS_MLP = {
    "name": "digits-mlp",
    "task": "classification",
    "data": {"source": "sklearn:digits", "target": "target"},
    "model": {"type": "mlp", "hidden": [256, 128]},
}
VARIANTS = {
    "torch-int8": {"quantize": {"method": "int8_dynamic", "backend": "torch"}},
    "ort-int8": {"quantize": {"method": "int8_dynamic", "backend": "onnxruntime"}},
}
LOOSE = {"metric": "accuracy", "max_drop": 1.0, "retries": 0}  # measure, never reject
WARMUP = 50


def time_calls(predict: Any, rows: Any, calls: int) -> tuple[float, float]:
    """Median and p90 of ``calls`` calls, in ms, after a warm-up."""
    for _ in range(WARMUP):
        predict(rows)
    times = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        predict(rows)
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 90))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="Timed calls per figure.")
    ap.add_argument("--epochs", type=int, default=10, help="Training epochs of the MLP.")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads.")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    spec = {
        **DIGITS_MLP,
        "train": {"optimizer": {"name": "adam", "lr": 0.001}, "epochs": args.epochs},
    }
    table = read_table("sklearn:digits").drop(columns=["target"])
    one = table.iloc[0].to_dict()
    batch = table.iloc[:256].to_dict(orient="records")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kiln.fit(spec, out=root / "fp32")
        paths = {"fp32": root / "fp32"}
        for name, step in VARIANTS.items():
            result = compress(
                {"source": str(root / "fp32"), "steps": [step], "tolerance": LOOSE},
                root / name,
                measure_runs=30,
            )
            assert result.variants[0].path is not None
            paths[name] = result.variants[0].path
        figures: dict[str, dict[str, tuple[float, float]]] = {}
        for name, path in paths.items():
            bundle = kiln.load(path)
            figures[name] = {
                "1 row": time_calls(bundle.predict, one, args.calls),
                "256 rows": time_calls(bundle.predict, batch, max(args.calls // 10, 50)),
            }
    print(
        f"kiln.load(path).predict(rows), digits MLP [256, 128], {len(one)} numeric columns, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(f"{'variant':<12}{'rows':>10}{'median ms':>12}{'p90 ms':>10}{'vs fp32':>10}")
    for name, by_rows in figures.items():
        for rows, (median, p90) in by_rows.items():
            speed = figures["fp32"][rows][0] / median
            print(f"{name:<12}{rows:>10}{median:>12.3f}{p90:>10.3f}{speed:>9.2f}x")
    print("targets: fp32 1 row <= 0.3 ms; an int8 variant > 1.00x vs fp32")


if __name__ == "__main__":
    main()
