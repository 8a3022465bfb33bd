"""kiln's training engine vs a plain hand-written PyTorch loop: same MLP, data, epochs.

    .venv/bin/python benchmarks/train_overhead.py [--rows 20000] [--epochs 10] [--repeats 5]

Both train the same architecture from the same initial weights with Adam on the same
in-memory tensors, and both evaluate validation loss and accuracy after every epoch.
Runs alternate (plain, kiln, plain, kiln, ...) and the median time of each is
reported with their ratio (target: <= 1.05). For reference it also times the common
DataLoader(TensorDataset) loop, which fetches rows one by one.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kiln.models.registry import build
from kiln.spec import MLPSpec, TrainSpec
from kiln.train.loop import TensorData, fit_model


def make_data(rows: int, features: int, classes: int) -> TensorData:
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, features, generator=gen) * 0.3
    y = torch.randint(0, classes, (rows,), generator=gen)
    x = centers[y] + torch.randn(rows, features, generator=gen)
    n_val = rows // 10
    return TensorData(x[n_val:], y[n_val:], x[:n_val], y[:n_val])


def plain_loop(model: nn.Module, d: TensorData, epochs: int, batch: int, lr: float) -> float:
    """What a person writes by hand: shuffle indices, slice, step; validate per epoch."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    n = len(d.x_train)
    acc = 0.0
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            loss = loss_fn(model(d.x_train[idx]), d.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.inference_mode():
            out = model(d.x_val)
            float(loss_fn(out, d.y_val))
            acc = float((out.argmax(1) == d.y_val).float().mean())
    return acc


def dataloader_loop(model: nn.Module, d: TensorData, epochs: int, batch: int, lr: float) -> float:
    """The tutorial loop: DataLoader over a TensorDataset (per-row __getitem__ + collate)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(d.x_train, d.y_train), batch_size=batch, shuffle=True)
    acc = 0.0
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.inference_mode():
            out = model(d.x_val)
            acc = float((out.argmax(1) == d.y_val).float().mean())
    return acc


def kiln_loop(model: nn.Module, d: TensorData, epochs: int, batch: int, lr: float) -> float:
    spec = TrainSpec.model_validate(
        {
            "optimizer": {"name": "adam", "lr": lr},
            "batch_size": batch,
            "epochs": epochs,
            "device": "cpu",
        }
    )
    result = fit_model(model, d, spec, "classification", "cross_entropy")
    return float(result.history[-1]["val_accuracy"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    data = make_data(args.rows, args.features, args.classes)
    torch.manual_seed(0)
    base = build(MLPSpec(hidden=[128, 64]), args.features, args.classes)
    runners = {"plain": plain_loop, "kiln": kiln_loop, "dataloader": dataloader_loop}
    times: dict[str, list[float]] = {k: [] for k in runners}
    accs: dict[str, float] = {}
    steps = -(-len(data.x_train) // args.batch) * args.epochs
    print(
        f"MLP [128, 64] on {len(data.x_train)} train / {len(data.x_val)} val rows x "  # type: ignore[arg-type]
        f"{args.features} features, {args.epochs} epochs, batch {args.batch} "
        f"({steps} steps), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    kiln_loop(copy.deepcopy(base), data, 1, args.batch, 1e-3)  # warm-up (lazy imports)
    plain_loop(copy.deepcopy(base), data, 1, args.batch, 1e-3)
    for _ in range(args.repeats):
        for name, run in runners.items():
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            accs[name] = run(model, data, args.epochs, args.batch, 1e-3)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in runners:
        print(
            f"{name:>10}: median {med[name]:.3f} s  (min {min(times[name]):.3f}, "
            f"max {max(times[name]):.3f}; {args.repeats} runs)  val accuracy {accs[name]:.4f}"
        )
    ratio = med["kiln"] / med["plain"]
    print(f"ratio kiln / plain loop: {ratio:.3f}  (target <= 1.05)")
    print(f"ratio dataloader loop / plain loop: {med['dataloader'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
