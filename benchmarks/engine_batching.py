"""Continuous batching vs one-at-a-time decoding on a tiny random Llama (CPU, torch).

    .venv/bin/python benchmarks/engine_batching.py [--new-tokens 64] [--hidden 256] [--runs 5]

Both engines get the same greedy requests through the serving interface
(``submit`` + async consumption): :class:`kiln.serve.engine.GenerationEngine` (the
continuous-batching scheduler) and :class:`kiln.serve.engine.SequentialEngine` (the
baseline: one sequence at a time with the generator's own stream). At 1 and 8 concurrent
sequences (different prompts, each generating ``--new-tokens``; no eos so every one runs
the full length) it prints aggregate generated tokens / wall time, the median of
``--runs`` (the two engines alternating) after one untimed warm-up, and checks that
both engines produced the same texts. Figures only, nothing asserted; they move with
the machine's load (printed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kiln.runtime.generation import SamplingParams, TorchGenerator
from kiln.serve.engine import GenerationEngine, SequentialEngine
from support import TINY_TEXTS, tiny_bpe, tiny_llama

Engine = GenerationEngine | SequentialEngine


async def serve(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[str]:
    """Submit every prompt at once; each one's text, consumed concurrently."""

    async def consume(prompt: list[int]) -> str:
        return "".join([e.text async for e in engine.submit(prompt, params)])

    return await asyncio.gather(*(consume(p) for p in prompts))


async def measure(
    gen: TorchGenerator, prompts: list[list[int]], args: argparse.Namespace
) -> tuple[float, float, bool]:
    """Median tokens/s of the baseline and the batching engine over ``args.runs`` runs
    each, alternating (the machine's load hits both alike), after a warm-up of each;
    and whether their texts were the same."""
    params = SamplingParams(max_new_tokens=args.new_tokens, eos_ids=(-1,))
    engines: list[Engine] = [SequentialEngine(gen), GenerationEngine(gen, max_num_seqs=8)]
    try:
        texts = [await serve(e, prompts, params) for e in engines]  # warm-up
        rates: list[list[float]] = [[], []]
        for _ in range(args.runs):
            for engine, rate in zip(engines, rates, strict=True):
                start = time.perf_counter()
                await serve(engine, prompts, params)
                rate.append(len(prompts) * args.new_tokens / (time.perf_counter() - start))
        return statistics.median(rates[0]), statistics.median(rates[1]), texts[0] == texts[1]
    finally:
        for engine in engines:
            await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = tiny_bpe()
    model = tiny_llama(
        tok,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    gen = TorchGenerator(model, tok)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    rows = [list(tok(t)["input_ids"]) for t in TINY_TEXTS]
    print(
        f"tiny Llama: hidden {args.hidden}, {args.layers} layers, {params_m:.1f}M parameters; "
        f"{args.new_tokens} new tokens per sequence; torch threads {args.threads}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'concurrent':>10} {'sequential tok/s':>17} {'batching tok/s':>15} {'speed-up':>9}")
    for n in (1, 8):
        prompts = [rows[i % len(rows)] for i in range(n)]
        base, fast, equal = asyncio.run(measure(gen, prompts, args))
        same = "" if equal else "  (TEXTS DIFFER)"
        print(f"{n:>10} {base:>17.0f} {fast:>15.0f} {fast / base:>8.2f}x{same}")


if __name__ == "__main__":
    main()
