"""``kiln.fit`` for task generation, end to end on tiny models: a gpt trained from scratch
on chats written here, and a tiny pretrained Llama directory fine-tuned with LoRA.

The bundle saves, reloads in a fresh offline process that may not unpickle, and
generates the same greedy text; resume equals an uninterrupted run; validation loss and
perplexity are logged every epoch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import kiln
from kiln.errors import Interrupted
from kiln.lm_bundle import LMBundle
from kiln.train.callbacks import Callback
from kiln.train.checkpoint import DirCheckpoints
from support import gpt_spec, offline_json, tiny_bpe, tiny_llama, write_chats


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chats(tmp_path_factory.mktemp("lm") / "chats.jsonl")


@pytest.fixture(scope="module")
def trained(chats: Path, tmp_path_factory: pytest.TempPathFactory) -> LMBundle:
    out = tmp_path_factory.mktemp("bundles") / "tiny-gpt"
    bundle = kiln.fit(gpt_spec(chats, epochs=4), out=out)
    assert isinstance(bundle, LMBundle)
    return bundle


def test_generation_fit_logs_val_loss_and_perplexity_every_epoch(trained: LMBundle) -> None:
    history = trained.meta.training.history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for h in history:
        assert math.isclose(h["val_perplexity"], math.exp(h["val_loss"]), rel_tol=1e-6)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    test = trained.metrics["test"]
    assert test["perplexity"] == pytest.approx(math.exp(test["loss"]))
    tokens = trained.meta.training.tokens
    assert tokens is not None and 0 < tokens.trained < tokens.tokens


def test_the_bundle_holds_the_documented_files(trained: LMBundle) -> None:
    assert trained.path is not None
    files = set(trained.meta.files)
    assert {"weights.safetensors", "generation.json"} <= files
    assert any(f.startswith("tokenizer/") for f in files)
    generation = json.loads((trained.path / "generation.json").read_text())
    assert generation["prompt_format"] == "chat"
    # every training chat opened with the same system message: prompts without one get it
    assert generation["system"] == "Answer with the colour only."
    with_default = trained.prompt_ids("Which colour?")
    assert with_default == trained.prompt_ids("Which colour?", system=generation["system"])
    assert with_default != trained.prompt_ids(
        [{"role": "user", "content": "Which colour?"}], system="Something else."
    )
    assert generation["eos_ids"] == [trained.tokenizer.eos_token_id]
    assert trained.meta.task == "generation"


RELOAD = """
import json, pickle, socket, sys

def refuse(*args, **kwargs):
    raise AssertionError("loading must not unpickle or reach the network")

pickle.load = pickle.loads = refuse
socket.socket.connect = refuse
import torch
torch.load = refuse
import kiln

bundle = kiln.load(sys.argv[1])
done = bundle.generate(sys.argv[2], max_new_tokens=12)
print(json.dumps({"text": done.text, "ids": done.token_ids}))
"""


def test_reloaded_in_a_fresh_offline_process_it_generates_the_same(trained: LMBundle) -> None:
    prompt = "I want a green kite. Which colour?"
    here = trained.generate(prompt, max_new_tokens=12)
    there = offline_json(RELOAD, str(trained.path), prompt)
    assert there == {"text": here.text, "ids": here.token_ids}


def test_stream_deltas_join_to_the_generated_text(trained: LMBundle) -> None:
    prompt = [{"role": "user", "content": "I want a red pen. Which colour?"}]
    stream = trained.stream(prompt, max_new_tokens=10)
    text = "".join(stream)
    assert stream.completion is not None
    assert text == stream.completion.text == trained.generate(prompt, max_new_tokens=10).text


def test_evaluate_scores_the_last_assistant_turn(trained: LMBundle, chats: Path) -> None:
    result = trained.evaluate(chats, max_new_tokens=6)
    metrics = result.metrics
    assert metrics["rows"] == 48 and len(result.answers) == 48
    assert {"loss", "perplexity", "exact_match", "normalized_match", "rouge_l"} <= set(metrics)
    exact = sum(a.prediction == a.reference for a in result.answers) / 48
    assert metrics["exact_match"] == pytest.approx(exact)
    assert result.answers[0].reference == "red"


class _StopAfter(Callback):
    """Ctrl-C after ``epochs`` epochs."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, logs: dict[str, float]) -> None:
        if logs["epoch"] == self.epochs:
            raise KeyboardInterrupt


def test_resume_equals_an_uninterrupted_run(chats: Path, tmp_path: Path) -> None:
    spec = gpt_spec(chats, epochs=3)
    whole = kiln.fit(spec, checkpoints=tmp_path / "a")
    with pytest.raises(Interrupted):
        kiln.fit(spec, checkpoints=tmp_path / "b", callbacks=[_StopAfter(1)])
    assert DirCheckpoints(tmp_path / "b").load() is not None
    resumed = kiln.fit(spec, checkpoints=tmp_path / "b", resume=True)
    assert resumed.meta.training.resumed_from_epoch == 1
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_a_conversation_with_nothing_left_to_train_on_names_its_line(tmp_path: Path) -> None:
    data = write_chats(tmp_path / "chats.jsonl", n=12)
    long = {
        "messages": [
            {"role": "user", "content": "word " * 200},
            {"role": "assistant", "content": "blue"},
        ]
    }
    with data.open("a") as fh:
        fh.write(json.dumps(long) + "\n")
    spec = gpt_spec(data)
    spec["data"]["split"] = {"val": 0.0, "test": 0.0}
    with pytest.raises(kiln.DataError, match="line 13"):
        kiln.fit(spec)


def test_lora_kept_as_an_adapter_references_its_base(tmp_path: Path, chats: Path) -> None:
    """``lora: {merge: false}``: the bundle holds the adapter and the base's path and
    SHA-256; it reloads on the same base and refuses a changed one."""
    tok = tiny_bpe(chats.read_text().splitlines())
    base = tiny_llama(tok)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    spec = {
        "name": "tiny-adapter",
        "task": "generation",
        "data": {"source": str(chats), "split": {"val": 0.0, "test": 0.0}},
        "model": {
            "type": "causal_lm",
            "path": str(base_dir),
            "max_length": 64,
            "lora": {"r": 4, "alpha": 8, "merge": False},
        },
        "train": {"optimizer": {"name": "adamw", "lr": 1e-2}, "epochs": 1, "batch_size": 8},
    }
    out = tmp_path / "bundle"
    trained = kiln.fit(spec, out=out)
    files = set(json.loads((out / "kiln.json").read_text())["files"])
    assert "adapter/adapter_model.safetensors" in files and "weights.safetensors" not in files
    prompt = "I want a red pen. Which colour?"
    reloaded = kiln.load(str(out))
    assert isinstance(reloaded, LMBundle)
    assert (
        reloaded.generate(prompt, max_new_tokens=6).token_ids
        == trained.generate(prompt, max_new_tokens=6).token_ids
    )
    torch.nn.init.zeros_(base.lm_head.weight)  # another base under the same path
    base.save_pretrained(base_dir)
    with pytest.raises(kiln.BundleError, match="SHA-256 differs"):
        kiln.load(str(out))


def test_gradient_accumulation_equals_one_big_batch_in_tokens(chats: Path) -> None:
    """Micro-batches of 4 accumulated twice step like batches of 8: each micro-batch is
    weighted by its answer tokens (the loss is a token mean), not by its rows."""
    spec = gpt_spec(chats, epochs=1)
    spec["data"]["split"] = {"val": 0.0, "test": 0.0}
    big = kiln.fit(spec)
    spec["train"] |= {"batch_size": 4, "gradient_accumulation": 2}
    small = kiln.fit(spec)
    for key, value in big.model.state_dict().items():
        torch.testing.assert_close(small.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    assert big.meta.training.history[0]["train_loss"] == pytest.approx(
        small.meta.training.history[0]["train_loss"], rel=1e-4
    )


def test_the_progress_bar_shows_training_tokens_per_second(
    chats: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A language model's run gets a second bar, over the epoch's batches, with tokens/s."""
    from kiln.train.callbacks import RichProgress

    class Tokens(Callback):
        seen = 0

        def on_batch_tokens(self, tokens: int) -> None:
            Tokens.seen += tokens

    spec = gpt_spec(chats, epochs=1)
    spec["data"]["split"] = {"val": 0.0, "test": 0.0}
    progress = RichProgress("training tiny-gpt")
    bundle = kiln.fit(spec, callbacks=[progress, Tokens()])
    err = capsys.readouterr().err
    assert "tokens/s" in err and "batches" in err
    tokens = bundle.meta.training.tokens
    assert tokens is not None and Tokens.seen == tokens.tokens  # every real token, once


def test_a_bundle_with_a_link_is_refused(trained: LMBundle, tmp_path: Path) -> None:
    """A listed, hashed file that is a link would read outside the bundle."""
    import shutil

    assert trained.path is not None
    copy = tmp_path / "copy"
    shutil.copytree(trained.path, copy)
    target = tmp_path / "outside.json"
    shutil.copy(copy / "generation.json", target)
    (copy / "generation.json").unlink()
    (copy / "generation.json").symlink_to(target)  # same bytes, so the hash matches
    with pytest.raises(kiln.BundleError, match="holds links"):
        kiln.load(str(copy))
