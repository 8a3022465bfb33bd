"""Generation specs: what applies to them and what does not."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.errors import SpecError
from kiln.spec import load_spec


def _gen(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "g",
        "task": "generation",
        "data": {"source": "chats.jsonl"},
        "model": {"type": "gpt", "dim": 32, "heads": 2},
    }
    for key, value in over.items():
        merged = {**spec.get(key, {}), **value}
        spec[key] = {k: v for k, v in merged.items() if v is not None}
    return spec


def test_a_generation_spec_needs_no_target_and_resolves_the_token_loss() -> None:
    spec = load_spec(_gen())
    assert spec.resolved_loss == "token_cross_entropy"
    assert spec.train.loss_on == "assistant" and not spec.train.packing


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"model": {"type": "mlp", "dim": None, "heads": None}}, "model.type"),
        ({"data": {"target": "y"}}, "data.target"),
        ({"data": {"format": "chat", "text": "t"}}, "data.text"),
        ({"model": {"heads": 3}}, "model.gpt"),  # dim 32 is not divisible by 3
        ({"train": {"loss": "mse"}}, "train.loss"),
        ({"train": {"early_stopping": {"metric": "val_accuracy"}}}, "train.early_stopping.metric"),
    ],
)
def test_what_does_not_apply_to_generation_is_refused(over: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(_gen(**over))
    assert err.value.field == field


@pytest.mark.parametrize("key", ["loss_on", "packing"])
def test_generation_only_train_keys_are_refused_elsewhere(key: str) -> None:
    spec = {
        "name": "c",
        "task": "classification",
        "data": {"source": "sklearn:iris", "target": "target"},
        "model": {"type": "linear"},
        "train": {key: True if key == "packing" else "all"},
    }
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert err.value.field == f"train.{key}"


def test_early_stopping_may_watch_val_perplexity() -> None:
    spec = load_spec(_gen(train={"early_stopping": {"metric": "val_perplexity"}}))
    assert spec.train.early_stopping is not None


def test_a_dumped_generation_spec_loads_again() -> None:
    spec = load_spec(_gen(train={"packing": True, "loss_on": "all"}))
    assert load_spec(spec.model_dump(mode="json")) == spec  # as a bundle's lineage holds it
