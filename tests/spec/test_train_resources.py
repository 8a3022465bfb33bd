"""``train.resources``: strict, bounded, refused where Ray workers cannot train; without a
Ray cluster the spec trains in this process."""

from __future__ import annotations

import pytest

import kiln
from kiln.errors import SpecError

BASE = {
    "name": "r",
    "task": "classification",
    "data": {"source": "sklearn:iris", "target": "target"},
    "train": {"epochs": 2, "device": "cpu"},
}


def _spec(model: dict[str, object], resources: object) -> dict[str, object]:
    return {**BASE, "model": model, "train": {**BASE["train"], "resources": resources}}  # type: ignore[dict-item]


def test_defaults_and_bounds() -> None:
    spec = kiln.load_spec(_spec({"type": "linear"}, {}))
    assert spec.train.resources is not None
    assert (spec.train.resources.workers, spec.train.resources.cpus_per_worker) == (1, 1.0)
    assert spec.train.resources.gpus_per_worker == 0.0
    for bad, field in (
        ({"workers": 0}, "workers"),
        ({"cpus_per_worker": 0}, "cpus_per_worker"),
        ({"gpus": 1}, "gpus"),
    ):
        with pytest.raises(SpecError) as err:
            kiln.load_spec(_spec({"type": "linear"}, bad))
        assert field in str(err.value), err.value


@pytest.mark.parametrize("model", [{"type": "gbdt"}, {"type": "auto"}])
def test_tree_and_auto_models_refuse_resources(model: dict[str, object]) -> None:
    with pytest.raises(SpecError) as err:
        kiln.load_spec(_spec(model, {"workers": 2}))
    assert err.value.field == "train.resources"


def test_without_an_executor_the_spec_trains_in_this_process() -> None:
    with_resources = kiln.fit(_spec({"type": "linear"}, {"workers": 2}))
    plain = kiln.fit({**BASE, "model": {"type": "linear"}})
    assert with_resources.metrics["test"] == plain.metrics["test"]
