"""gbdt bundles: the booster is saved in the library's own format, hashed in kiln.json,
and loads in a fresh process without unpickling, predicting exactly as before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_gbdt import LIBRARIES, gbdt_spec, tree_table, write  # tests/models is on sys.path

import kiln
from kiln.bundle import META_FILE, Bundle, sha256_file
from kiln.errors import BundleError
from kiln.models.gbdt import BOOSTER_FILES

# As tests/test_bundle.py: any unpickling (pickle or torch.load) fails the load.
LOAD_SCRIPT = """
import json, pickle, sys

def refuse(*args, **kwargs):
    raise AssertionError("bundle loading must not unpickle")

pickle.load = pickle.loads = refuse
pickle.Unpickler = refuse
import torch

torch.load = refuse
import kiln

bundle = kiln.load(sys.argv[1])
rows = json.loads(sys.argv[2])
print(json.dumps(bundle.predict(rows).to_dict()))
"""

ROWS: list[dict[str, Any]] = [
    {"x1": 0.3, "x2": 4.0, "color": "red"},
    {"x1": None, "x2": 1.0, "color": "green"},
    {"x1": -1.2, "x2": None, "color": None},
    {"x1": 1.5, "x2": 9.0, "color": "purple"},  # unseen category
]


@pytest.fixture(scope="module", params=LIBRARIES)
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp(f"gbdt-{request.param}")
    spec = gbdt_spec(write(tmp, tree_table(task="multiclass")), request.param)
    out = tmp / "bundle"
    kiln.fit(spec, out=out)
    return out


def library_of(path: Path) -> str:
    return str(json.loads((path / META_FILE).read_text())["model"]["library"])


def test_bundle_lists_and_hashes_the_booster(saved: Path) -> None:
    booster = BOOSTER_FILES[library_of(saved)]
    files = json.loads((saved / META_FILE).read_text())["files"]
    assert files[booster] == sha256_file(saved / booster)
    assert "weights.safetensors" in files  # written, and empty
    if booster.endswith(".txt"):
        assert (saved / booster).read_text().startswith("tree")  # LightGBM model text
    else:
        assert (saved / booster).read_bytes()[:1] == b"{"  # XGBoost JSON


def test_predictions_identical_in_a_fresh_process_without_unpickling(saved: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(saved), json.dumps(ROWS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    want = Bundle.load(saved).predict(ROWS).to_dict()
    assert got == json.loads(json.dumps(want))  # bit for bit, through JSON
    assert np.isfinite(np.asarray(got["probabilities"])).all()


def test_a_tampered_booster_fails_the_checksum(saved: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    Bundle.load(saved).save(copy)
    booster = copy / BOOSTER_FILES[library_of(saved)]
    data = bytearray(booster.read_bytes())
    data[len(data) // 2] ^= 0x01
    booster.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        Bundle.load(copy)


def test_a_booster_with_another_feature_count_is_refused(saved: Path, tmp_path: Path) -> None:
    """Even with a matching checksum, a booster for other inputs does not load."""
    library = library_of(saved)
    frame = tree_table(task="multiclass").assign(x3=1.0)
    other = kiln.fit(gbdt_spec(write(tmp_path, frame), library, n_estimators=3))
    assert isinstance(other, Bundle)
    copy = tmp_path / "copy"
    Bundle.load(saved).save(copy)
    name = BOOSTER_FILES[library]
    other_bytes = other.model.booster_bytes()  # type: ignore[operator]
    (copy / name).write_bytes(other_bytes)
    meta = json.loads((copy / META_FILE).read_text())
    meta["files"][name] = sha256_file(copy / name)
    (copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="takes 4 inputs, the manifest says 3"):
        Bundle.load(copy)


def test_a_booster_that_does_not_parse_is_a_bundle_error(saved: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    Bundle.load(saved).save(copy)
    name = BOOSTER_FILES[library_of(saved)]
    (copy / name).write_bytes(b"not a model")
    meta = json.loads((copy / META_FILE).read_text())
    meta["files"][name] = sha256_file(copy / name)
    (copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=name):
        Bundle.load(copy)
