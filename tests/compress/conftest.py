"""Tiny source bundles shared by the compression tests, trained once per session.

Measuring a variant's peak memory starts a fresh Python process per bundle (seconds
each); ``run_compress`` stubs that one measurement out so the suite stays fast. The real
measurement is tested once, in test_compress_measure.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

IRIS_MLP: dict[str, Any] = {
    "name": "iris-mlp",
    "task": "classification",
    "data": {"source": "sklearn:iris", "target": "target"},
    "model": {"type": "mlp", "hidden": [32, 16]},
    "train": {
        "epochs": 30,
        "batch_size": 16,
        "device": "cpu",
        "optimizer": {"name": "adam", "lr": 0.01},
    },
}

# torch int8 keeps BatchNorm in float, so this model still has parameters once quantized.
IRIS_BN: dict[str, Any] = {
    **IRIS_MLP,
    "name": "iris-bn",
    "model": {"type": "mlp", "hidden": [16, 8], "batch_norm": True},
    "train": {**IRIS_MLP["train"], "epochs": 20, "optimizer": {"name": "adam", "lr": 0.02}},
}

DIABETES_MLP: dict[str, Any] = {
    "name": "diabetes-mlp",
    "task": "regression",
    "data": {"source": "sklearn:diabetes", "target": "target"},
    "model": {"type": "mlp", "hidden": [32, 16]},
    "train": {
        "epochs": 30,
        "batch_size": 32,
        "device": "cpu",
        "optimizer": {"name": "adam", "lr": 0.01},
    },
}

IRIS_LINEAR: dict[str, Any] = {
    **IRIS_MLP,
    "name": "iris-linear",
    "model": {"type": "linear"},
    "train": {**IRIS_MLP["train"], "epochs": 5, "optimizer": {"name": "adam", "lr": 0.05}},
}


@pytest.fixture(scope="session")
def sources_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compress-sources")


def _fit(spec: dict[str, Any], out: Path) -> Path:
    import kiln

    kiln.fit(spec, out=out)
    return out


@pytest.fixture(scope="session")
def iris_mlp(sources_root: Path) -> Path:
    """A two-hidden-layer MLP on iris (no batch norm)."""
    return _fit(IRIS_MLP, sources_root / "iris-mlp")


@pytest.fixture(scope="session")
def iris_bn(sources_root: Path) -> Path:
    """An MLP with batch norm on iris."""
    return _fit(IRIS_BN, sources_root / "iris-bn")


@pytest.fixture(scope="session")
def diabetes_mlp(sources_root: Path) -> Path:
    """A regression MLP on diabetes."""
    return _fit(DIABETES_MLP, sources_root / "diabetes-mlp")


@pytest.fixture(scope="session")
def iris_linear(sources_root: Path) -> Path:
    """A softmax regression on iris."""
    return _fit(IRIS_LINEAR, sources_root / "iris-linear")


@pytest.fixture(scope="session")
def run_compress() -> Callable[..., Any]:
    """``run_compress(spec, out, **kw)``: kiln.compress.pipeline.compress with 30 timed runs
    and the peak-memory subprocess replaced by None."""

    def _run(spec: Any, out: Path, **kwargs: Any) -> Any:
        from kiln.compress import measure
        from kiln.compress.pipeline import compress

        kwargs.setdefault("measure_runs", 30)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(measure, "peak_memory", lambda directory: None)
            return compress(spec, out, **kwargs)

    return _run
