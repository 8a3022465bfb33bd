"""Encryption at rest, probed as someone who can read (or write) the artifact folder.

A dataset with a marker in one column is uploaded through the real API, a model is
trained on it by a real worker, deployed, and asked predictions that carry the marker
(so the prediction log holds it too). Then every file under the artifact folder is
read raw: none may contain the marker or any window of the trained weights' bytes,
while the API still hands back the plaintext. Restarts, a wrong key, a tampered file
and ``kiln keys rotate-master`` are checked against the real server and CLI.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.conftest import API, Platform
from kiln.app import build_services, create_app
from kiln.errors import EncryptionError
from support import free_port, kiln_env, wait_for

MARKER = "ZEBRA-MARKER-c0ffee"


def marked_csv() -> bytes:
    rng = np.random.default_rng(0)
    lines = ["x1,x2,color,target"]
    for i in range(90):
        x1, x2 = rng.normal(size=2)
        color = (MARKER, "teal", "plum")[i % 3]
        lines.append(f"{x1:.4f},{x2:.4f},{color},{int(x1 > 0)}")
    return ("\n".join(lines) + "\n").encode()


def spec(ref: str) -> dict[str, Any]:
    return {
        "name": "enc",
        "task": "classification",
        "data": {"source": ref, "target": "target"},
        "model": {"type": "mlp", "hidden": [32]},
        "train": {"epochs": 3, "device": "cpu"},
    }


def raw_files(settings: Any) -> dict[str, bytes]:
    root = Path(settings.resolved_artifacts)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def trained(p: Platform) -> None:
    r = p.upload(p.admin, marked_csv(), "marked.csv")
    assert r.status_code == 201, r.text
    job = p.queued(p.admin, "train", spec(r.json()["ref"]))
    p.run_jobs()
    state = p.get(f"/jobs/{job}", p.admin).json()
    assert state["state"] == "succeeded", state


def download(client: TestClient, admin: str, tmp: Path) -> Path:
    r = client.get(f"{API}/models/enc/versions/1/bundle", headers=Platform.auth(admin))
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        tar.extractall(tmp, filter="data")
    return tmp / "enc-v1"


def weight_windows(bundle: Path) -> list[bytes]:
    """64-byte windows from the start, middle and end of every weight tensor of 16+ values."""
    from safetensors.numpy import load_file

    out = []
    for tensor in load_file(str(bundle / "weights.safetensors")).values():
        data = tensor.tobytes()
        if len(data) >= 64:
            mid = len(data) // 2 - 32
            out += [data[:64], data[mid : mid + 64], data[-64:]]
    assert out
    return out


def test_the_artifact_folder_holds_only_ciphertext(
    make_platform: Callable[..., Platform], tmp_path: Path
) -> None:
    p = make_platform(prediction_log_sample=1.0, monitor_flush_seconds=0.05)
    trained(p)
    log_prefix = "projects/default/deployments/enc/predictions"
    row = {"x1": 0.5, "x2": -1.0, "color": MARKER}
    with p.client:  # the lifespan runs: deployments and the prediction log
        r = p.post("/deployments", p.admin, {"name": "enc", "model": "enc", "version": 1})
        assert r.status_code == 201, r.text
        r = p.post("/deployments/enc/predict", p.admin, {"inputs": [row, row]})
        assert r.status_code == 200, r.text
        wait_for(lambda: bool(p.svc.store.list(log_prefix)), what="the prediction log")
    bundle = download(p.client, p.admin, tmp_path)
    files = raw_files(p.settings)
    kinds = {"/datasets/", "/models/", "/deployments/"}
    assert all(any(k in name for name in files) for k in kinds), sorted(files)
    needles = [MARKER.encode(), *weight_windows(bundle)]
    for name, data in files.items():
        assert data.startswith(b"KILNENC"), name
        for needle in needles:
            assert needle not in data, f"plaintext in {name}"
    # ... while the platform reads it all back: the log, the dataset, the bundle
    logged = b"".join(p.svc.store.get_bytes(k) for k in p.svc.store.list(log_prefix))
    assert MARKER.encode() in logged
    dataset = next(k for k in files if "/datasets/" in k)
    assert p.svc.store.get_bytes(dataset) == marked_csv()
    import kiln

    assert len(kiln.load(bundle).predict([row]).predictions) == 1


def _kiln(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = kiln_env(home, **env)
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli.main", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=180,  # a server that started with a wrong key would hang here: a failure
        check=False,
    )


@pytest.mark.e2e
def test_restart_wrong_key_tampering_and_rotate_master(
    make_platform: Callable[..., Platform], tmp_path: Path
) -> None:
    p = make_platform()
    trained(p)
    settings, admin = p.settings, p.admin
    p.close()

    # a restart with the same key file reads everything back
    again = build_services(settings)
    with TestClient(create_app(settings, services=again)) as client:
        bundle = download(client, admin, tmp_path / "after-restart")
        assert (bundle / "kiln.json").is_file()
        # a flipped bit in a stored bundle file is a clear error, never garbage
        weights = next(
            Path(settings.resolved_artifacts, k) for k in raw_files(settings) if "weights" in k
        )
        good = weights.read_bytes()
        weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        r = client.get(f"{API}/models/enc/versions/1/bundle", headers=Platform.auth(admin))
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "encryption_error"
        assert "integrity check" in r.json()["error"]["message"]
        weights.write_bytes(good)
    again.db.dispose()

    # a different key fails at start, in the library and as `kiln up`
    other = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(EncryptionError, match="KILN_MASTER_KEY"):
        build_services(settings.model_copy(update={"master_key": SecretStr(other)}))
    port = str(free_port())  # should the server (wrongly) start
    up = _kiln(settings.home_dir, "up", "--port", port, "--workers", "0", KILN_MASTER_KEY=other)
    assert up.returncode == EncryptionError.exit_code, up.stdout + up.stderr
    assert "KILN_MASTER_KEY" in up.stderr and "Traceback" not in up.stderr

    # rotate-master: the data stays, the new key reads it, the old one no longer does
    old = (settings.home_dir / "master.key").read_text().strip()
    before = raw_files(settings)
    rotated = _kiln(settings.home_dir, "keys", "rotate-master")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "Re-wrapped" in rotated.stdout and old not in rotated.stdout
    assert raw_files(settings) == before  # nothing re-encrypted
    with pytest.raises(EncryptionError, match="not the one that wrapped"):
        build_services(settings.model_copy(update={"master_key": SecretStr(old)}))
    fresh = build_services(settings)
    try:
        with TestClient(create_app(settings, services=fresh)) as client:
            assert (download(client, admin, tmp_path / "after-rotate") / "kiln.json").is_file()
    finally:
        fresh.db.dispose()
