"""The quickstart's serving step: serve a bundle on loopback, query it, stop it.

    python examples/serve_and_query.py models/digits-int8/01-quantize \
        examples/data/digits-sample.csv

Starts ``kiln serve`` with a fresh API key on a free port of 127.0.0.1, waits until it
is ready, sends the table's rows to the predict endpoint and one row through the KServe
v2 protocol, prints what came back, and shuts the server down.
"""

from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(bundle: str, table: str) -> int:
    port, key = free_port(), secrets.token_urlsafe(24)
    kiln = Path(sys.executable).with_name("kiln")
    command = [
        str(kiln),
        "serve",
        bundle,
        "--port",
        str(port),
        "--api-key",
        key,
        "--name",
        "digits",
    ]
    print("$ kiln serve", bundle, "--port", port, "--api-key ***")
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - as long as the server lives
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)  # noqa: S603
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                log.seek(0)
                print(log.read(), file=sys.stderr)
                return 1
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                print("the server did not become ready in 120 s", file=sys.stderr)
                return 1
            time.sleep(0.3)
        rows = pd.read_csv(table).drop(columns=["target"], errors="ignore")
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            answer = client.post(
                "/api/v1/deployments/digits/predict", json={"inputs": rows.to_dict("records")}
            )
            answer.raise_for_status()
            body = answer.json()
            print(f"POST /api/v1/deployments/digits/predict  ({len(rows)} rows)")
            print(
                f"  predictions: {body['predictions']}  (model {body['model']} v{body['version']})"
            )
            v2 = client.post(
                "/v2/models/digits/infer",
                json={
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [1, rows.shape[1]],
                            "datatype": "FP32",
                            "data": rows.iloc[0].astype(float).tolist(),
                        }
                    ]
                },
            )
            v2.raise_for_status()
            outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
            print(f"POST /v2/models/digits/infer (KServe v2)  prediction: {outputs['predictions']}")
            metrics = client.get("/metrics").text
            served = [
                line
                for line in metrics.splitlines()
                if line.startswith("kiln_requests_total{") and 'code="200"' in line
            ]
            print("GET /metrics:", "; ".join(served))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
