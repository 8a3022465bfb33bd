"""Fuzz the REST API with schemathesis against a live ``kiln up``; exit 1 on any failure.

A fresh KILN_HOME (temporary), loopback, a free port. Two runs: a read-only key of the
default project, then the admin key made at first start. Every check runs (all of
schemathesis 4's, less the exceptions ``.ci/schemathesis.toml`` lists and justifies); the
admin run leaves out ``DELETE /api/v1/keys/{key_id}`` so the fuzzer cannot revoke the key
it is using. Rate limits are set far above what the fuzzer sends.

    .venv/bin/python .ci/fuzz.py [--max-examples N] [--max-time SECONDS]

Prints, per key, the cases run and the failures; the reports (JUnit, NDJSON, the
fuzzer's output, the server log) go to ``--report-dir`` (default test-artifacts/fuzz).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(url: str, key: str, method: str = "GET", body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http://127.0.0.1
    request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        return json.loads(response.read() or b"null")


def wait_healthy(url: str, server: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"kiln up exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):  # noqa: S310
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("kiln up did not answer /healthz")


def seed(url: str, admin: str) -> str:
    """A dataset to find, and the read-only key of the default project."""
    boundary = "kilnfuzz"
    table = b"x,y\n1,a\n2,b\n3,a\n4,b\n"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="seed.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode()
        + table
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(f"{url}/api/v1/datasets", data=body, method="POST")  # noqa: S310
    request.add_header("Authorization", f"Bearer {admin}")
    request.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    urllib.request.urlopen(request, timeout=30).close()  # noqa: S310
    made = call(
        f"{url}/api/v1/keys",
        admin,
        "POST",
        {"project": "default", "scopes": ["read"], "name": "fuzz"},
    )
    assert isinstance(made, dict)
    return str(made["key"])


CASES = re.compile(r"Test cases:\s*(.+)")


def fuzz(url: str, key: str, label: str, args: argparse.Namespace, exclude: list[str]) -> bool:
    report = Path(args.report_dir).resolve() / label
    command = [
        str(BIN / "schemathesis"),
        "--config-file",
        str(ROOT / ".ci" / "schemathesis.toml"),
        "run",
        f"{url}/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        # every check is on (schemathesis 4's default, the same as --checks all, which
        # would also override the per-operation exceptions in the config file)
        *args.exclude_checks,
        "--max-examples",
        str(args.max_examples),
        "--max-time",
        str(args.max_time),
        # one worker: CPython 3.11's ast is not thread-safe, and hypothesis parses
        # lambdas with it ("AST constructor recursion depth mismatch" with two)
        "--workers",
        "1",
        "--seed",
        str(args.seed),
        "--request-timeout",
        "30",
        "--report",
        "junit,ndjson",
        "--report-dir",
        str(report),
        # hypothesis's health checks (slow or heavily filtered generation) would stop an
        # operation's fuzzing, not flag anything the server did
        "--suppress-health-check",
        "all",
        "--output-sanitize",
        "true",
        *exclude,
    ]
    started = time.monotonic()
    report.mkdir(parents=True, exist_ok=True)
    # run inside the report folder: schemathesis keeps its state in ./.schemathesis
    done = subprocess.run(  # noqa: S603
        command, capture_output=True, text=True, check=False, cwd=report
    )
    out = done.stdout + done.stderr
    (report / "output.txt").write_text(out)
    cases = CASES.findall(out)
    print(
        f"[{label}] exit {done.returncode} in {time.monotonic() - started:.0f} s; "
        f"test cases: {cases[-1] if cases else '?'}"
    )
    if done.returncode != 0:
        print(out[-6000:])
    return done.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=30)
    parser.add_argument("--max-time", type=int, default=90, help="seconds per key")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--report-dir", default=str(ROOT / "test-artifacts" / "fuzz"))
    parser.add_argument("--exclude-checks", nargs="*", default=[])
    args = parser.parse_args()
    args.exclude_checks = (
        ["--exclude-checks", ",".join(args.exclude_checks)] if args.exclude_checks else []
    )
    with tempfile.TemporaryDirectory(prefix="kiln-fuzz-") as home:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "KILN_HOME": home,
            # far above what two fuzzer workers send: a 429 would hide what a route does
            "KILN_RATE_LIMIT_API": "100000/second",
            "KILN_RATE_LIMIT_INFERENCE": "100000/second",
        }
        log = Path(home) / "server.log"
        with log.open("wb") as out:
            # no workers: the fuzz is of the HTTP surface; submitted jobs stay queued
            server = subprocess.Popen(  # noqa: S603 - our own kiln
                [str(BIN / "kiln"), "up", "--port", str(port), "--workers", "0"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_healthy(url, server)
            admin = (Path(home) / "admin.key").read_text().strip()
            reader = seed(url, admin)
            # the read-only key first: the admin run may set quotas and rate limits on the
            # default project, which would then answer the read-only key 429s
            ok_reader = fuzz(url, reader, "read-only", args, [])
            # never DELETE /keys/{key_id}: the fuzzer would revoke the key it runs with
            ok_admin = fuzz(
                url, admin, "admin", args, ["--exclude-path-regex", r"^/api/v1/keys/[^/]+$"]
            )
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        text = log.read_text(errors="replace")
        Path(args.report_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.report_dir) / "server.log").write_text(text)
        tracebacks = text.count("Traceback (most recent call last)")
        print(f"server log: {tracebacks} tracebacks (kept in {args.report_dir}/server.log)")
    # a traceback is an unhandled exception, a 500 even where no check looked
    return 0 if ok_admin and ok_reader and tracebacks == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
