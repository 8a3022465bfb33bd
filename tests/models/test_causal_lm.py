"""CausalLM builders (causal_lm, gpt), LoRA, bundle-style rebuilds, the BPE tokenizer.

Every model is tiny (hidden 32, 2 layers) and built from a config in the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from kiln.data.bpe import train_bpe_tokenizer
from kiln.errors import SpecError
from kiln.models.causal_lm import CausalLM, lora_targets
from kiln.models.registry import build
from kiln.spec.model import CausalLMSpec, GPTSpec, LMLoraSpec
from support import tiny_llama

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "Ünïcödé text, numbers 12345 and symbols ✓ <> {}",
] * 10
LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(TEXTS, 300)


def _gpt2(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=1,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tok: PreTrainedTokenizerFast) -> Path:
    d = tmp_path_factory.mktemp("llama")
    tiny_llama(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tok: PreTrainedTokenizerFast) -> Path:
    d = tmp_path_factory.mktemp("gpt2")
    _gpt2(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _batch(tok: PreTrainedTokenizerFast) -> torch.Tensor:
    enc = tok(["the quick brown fox", "a single step"], padding=True, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)  # (B, 2, L)


def _randomise_lora(model: torch.nn.Module) -> None:
    # lora_B starts at zero (adapters a no-op); give it values so merging is tested
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


# ---- causal_lm -------------------------------------------------------------------


def test_causal_lm_loads_pretrained_weights(llama_dir: Path, tok: PreTrainedTokenizerFast) -> None:
    model = build(CausalLMSpec(path=str(llama_dir)), len(tok), len(tok)).eval()
    assert isinstance(model, CausalLM)
    x = _batch(tok)
    logits = model(x)
    assert logits.shape == (2, x.shape[2], len(tok))
    reference = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    expected = reference(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
    torch.testing.assert_close(logits, expected)
    assert model.base_model() is model.hf
    assert model.hf_config()["model_type"] == "llama"


def test_causal_lm_refuses_a_tokenizer_larger_than_the_model(llama_dir: Path) -> None:
    with pytest.raises(SpecError, match="tokenizer and model do not match"):
        build(CausalLMSpec(path=str(llama_dir)), 10_000, 10_000)


def test_lora_auto_targets_every_projection(
    llama_dir: Path, gpt2_dir: Path, tok: PreTrainedTokenizerFast
) -> None:
    assert lora_targets(tiny_llama(tok)) == LLAMA_TARGETS
    assert lora_targets(_gpt2(len(tok))) == ["c_attn", "c_fc", "c_proj"]
    spec = CausalLMSpec(path=str(llama_dir), lora=LMLoraSpec(r=4, alpha=8))
    model = build(spec, len(tok), len(tok))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".")[-4] for n in trainable}  # ...<target>.lora_A.default.weight
    assert sorted(adapted) == LLAMA_TARGETS


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_merged_adapters_give_the_unmerged_output(
    which: str, llama_dir: Path, gpt2_dir: Path, tok: PreTrainedTokenizerFast
) -> None:
    path = llama_dir if which == "llama" else gpt2_dir
    spec = CausalLMSpec(path=str(path), lora=LMLoraSpec(r=4, alpha=8, dropout=0.0))
    model = build(spec, len(tok), len(tok)).eval()
    assert isinstance(model, CausalLM)
    _randomise_lora(model)
    x = _batch(tok)
    with torch.no_grad():
        unmerged = model(x)
        plain = model.base_model()  # adapters injected and active
        assert not type(plain).__module__.startswith("peft")
        model.merge_adapters()
        merged = model(x)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    base = build(CausalLMSpec(path=str(path)), len(tok), len(tok)).eval()
    with torch.no_grad():
        assert not torch.allclose(base(x), unmerged, atol=1e-4)  # the adapters did something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_lora_targets_that_match_nothing(llama_dir: Path, tok: PreTrainedTokenizerFast) -> None:
    spec = CausalLMSpec(path=str(llama_dir), lora=LMLoraSpec(target=["q_proj", "qkv"]))
    with pytest.raises(SpecError, match=r"\['qkv'\] match no module.*q_proj") as info:
        build(spec, len(tok), len(tok))
    assert info.value.field == "model.lora.target"


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_bundle_rebuild_from_hf_config_and_weights(
    which: str,
    llama_dir: Path,
    gpt2_dir: Path,
    tok: PreTrainedTokenizerFast,
    tmp_path: Path,
) -> None:
    """What a bundle does: save the config as JSON and the state dict as safetensors,
    rebuild from the config (fresh weights), load strictly: the same logits, still tied."""
    path = llama_dir if which == "llama" else gpt2_dir
    spec = CausalLMSpec(path=str(path), lora=LMLoraSpec(r=4, alpha=8))
    model = build(spec, len(tok), len(tok)).eval()
    assert isinstance(model, CausalLM)
    _randomise_lora(model)
    model.merge_adapters()
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    hf_config = json.loads(json.dumps(model.hf_config()))

    torch.manual_seed(123)  # fresh weights differ from the saved ones
    rebuilt = build(spec, len(tok), len(tok), hf_config=hf_config).eval()
    assert isinstance(rebuilt, CausalLM)
    rebuilt.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    x = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=0, rtol=0)
    hf = rebuilt.base_model()
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight


def test_state_dict_keeps_a_tied_tensor_once(tok: PreTrainedTokenizerFast) -> None:
    model = CausalLM(tiny_llama(tok))
    keys = set(model.state_dict())
    assert "hf.model.embed_tokens.weight" in keys and "hf.lm_head.weight" not in keys
    # an untied model keeps both
    untied = tiny_llama(tok)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert "hf.lm_head.weight" in CausalLM(untied).state_dict()
    # a missing key that is no alias still fails a strict load
    state = model.state_dict()
    del state["hf.model.norm.weight"]
    with pytest.raises(RuntimeError, match=r"norm\.weight"):
        model.load_state_dict(state, strict=True)


# ---- gpt -------------------------------------------------------------------------


def test_gpt_builder_makes_a_tied_llama(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    spec = GPTSpec(layers=2, heads=4, dim=32, max_length=64, vocab_size=300, dropout=0.1)
    ids = {"pad_id": tok.pad_token_id, "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id}
    torch.manual_seed(0)
    model = build(spec, len(tok), len(tok), **ids)
    torch.manual_seed(0)
    again = build(spec, len(tok), len(tok), **ids)
    assert isinstance(model, CausalLM) and isinstance(again, CausalLM)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # seeded: the same initial weights
    cfg = model.hf_config()
    assert cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (32, 2, 4)
    assert cfg["intermediate_size"] == 128 and cfg["max_position_embeddings"] == 64
    assert cfg["vocab_size"] == len(tok) and cfg["tie_word_embeddings"] is True
    assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1, 1)
    assert cfg["attention_dropout"] == 0.1
    hf = model.base_model()
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight

    model.eval()
    x = _batch(tok)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    rebuilt = build(spec, len(tok), len(tok), hf_config=json.loads(json.dumps(cfg))).eval()
    rebuilt.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=0, rtol=0)


# ---- BPE -------------------------------------------------------------------------

_TRAIN_IN_SUBPROCESS = """
import json, sys
from kiln.data.bpe import train_bpe_tokenizer
texts = json.loads(sys.stdin.read())
print(train_bpe_tokenizer(texts, 300).backend_tokenizer.to_str())
"""


def _learnt(tokenizer_json: str) -> tuple[object, object]:
    """(vocabulary + merges, added tokens): what training decides."""
    state = json.loads(tokenizer_json)
    return state["model"], state["added_tokens"]


def test_bpe_is_deterministic_across_processes() -> None:
    first = train_bpe_tokenizer(TEXTS, 300).backend_tokenizer.to_str()
    again = train_bpe_tokenizer(TEXTS, 300).backend_tokenizer.to_str()
    assert _learnt(again) == _learnt(first)
    out = subprocess.run(
        [sys.executable, "-c", _TRAIN_IN_SUBPROCESS],
        input=json.dumps(TEXTS),
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "", "OMP_NUM_THREADS": "1"},
    )
    assert _learnt(out.stdout) == _learnt(first)


def test_bpe_tokenizer_round_trips(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    assert len(tok) == 300
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 1)
    assert tok.bos_token == "<|endoftext|>"
    text = "never seen: Ωμέγα ✓ 🙂\nnew line\ttab"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: no unknown token
    assert len(tok("the quick brown fox")["input_ids"]) < len("the quick brown fox")  # merges
    user = tok.convert_tokens_to_ids("<|user|>")
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>\nhi<|endoftext|>\n<|assistant|>\n"
    assert tok(chat)["input_ids"][0] == user  # the role marker is one token

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 1, 1)
    assert loaded.chat_template == tok.chat_template
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
