"""Encode generation examples for causal-LM training: token ids, attention mask, labels.

Labels follow the Hugging Face convention: ``labels[t]`` is ``input_ids[t]`` where the
token is trained and -100 where it is not (prompt, system and user turns, padding); the
loss shifts them (the logits at t - 1 predict ``labels[t]``).

What is trained:

- ``chat`` (``loss_on: assistant``): only the assistant turns -- their content and the
  template's end-of-turn text after it (for ChatML ``<|im_end|>\\n``). The system and user
  turns and the template's assistant header (``<|im_start|>assistant\\n``) carry no label.
  The turns are found by rendering prefixes with the tokenizer's chat template
  (``messages[:i]`` with ``add_generation_prompt=True`` ends where an assistant turn
  starts; ``messages[:i + 1]`` ends where it stops) and tokenizing them: the tokens of each
  prefix must be a prefix of the full rendering's tokens. Where a tokenizer merges tokens
  across a boundary, the character spans are mapped through the offsets mapping instead
  (a token that overlaps an assistant span is trained); where the template renders
  earlier turns differently once later ones follow, each assistant turn is found by
  searching the full rendering. If neither works the example is a DataError.
- ``completion``: the prompt's tokens (with BOS where the tokenizer adds one) carry no
  label; the completion's tokens and an EOS do. ``loss_on: all`` trains the prompt too.
- ``text``: every token, plus an EOS.

Truncation keeps the start and cuts the end at ``max_length``; the lines of cut examples
are reported in ``Encoded.truncated``, and an example with nothing left to train on is a
DataError. ``packing`` fills rows of at most ``max_length`` tokens with whole examples in
order (each keeps its labels; an EOS separates them). As in TRL's packing, the attention
mask is 1 over every real token of a row, so a packed example attends to the examples
before it in the same row. A tokenizer without a pad token pads with EOS: padding is
masked out and unlabelled, so its id never matters.

``DEFAULT_CHAT_TEMPLATE`` (set by ``ensure_chat_template`` on tokenizers without a
template) renders each message as ``<|{role}|>\\n{content}{eos_token}\\n`` and, with
``add_generation_prompt``, ends with ``<|assistant|>\\n``. For a user message "hi" and
an assistant reply "hello" with EOS ``<|endoftext|>``::

    <|user|>
    hi<|endoftext|>
    <|assistant|>
    hello<|endoftext|>

The end of an assistant turn is the tokenizer's EOS, so generation stops there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from kiln.data.dialogs import Example, LMFormat, Message
from kiln.errors import DataError, SpecError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # the label of a token that carries no loss

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

LossOn = Literal["assistant", "all"]
Span = tuple[int, int]  # [start, end) character offsets in a rendering
Row = tuple[list[int], list[int]]  # (ids, labels) of one example or one packed row


@dataclass
class Encoded:
    """Encoded examples, right-padded to the longest row."""

    input_ids: np.ndarray  # (N, L) int64, right-padded with the pad id
    attention_mask: np.ndarray  # (N, L) int64, 1 over real tokens
    labels: np.ndarray  # (N, L) int64, -100 where no loss (prompt/system/user/padding)
    truncated: list[int] = field(default_factory=list)  # lines of examples cut at max_length
    tokens: int = 0  # real (non-pad) tokens
    trained_tokens: int = 0  # tokens with a label

    def tensor(self) -> np.ndarray:
        """(N, 2, L) int64: channel 0 token ids, channel 1 attention mask."""
        return np.stack([self.input_ids, self.attention_mask], axis=1)


def ensure_chat_template(tok: PreTrainedTokenizerBase) -> bool:
    """Give ``tok`` DEFAULT_CHAT_TEMPLATE if it has no chat template; True if it was set."""
    if getattr(tok, "chat_template", None):
        return False
    if tok.eos_token is None:
        raise SpecError(
            "the tokenizer has neither a chat template nor an EOS token to end turns with",
            field="model.path",
        )
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def encode_examples(
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    fmt: LMFormat,
    *,
    max_length: int,
    loss_on: LossOn,
    packing: bool,
) -> Encoded:
    """Tokenize ``examples`` of format ``fmt`` into ids, mask and labels (see the module doc)."""
    if not examples:
        raise DataError("there are no examples to encode", field="data.source")
    if max_length < 2:
        raise SpecError(f"max_length must be at least 2, got {max_length}", field="max_length")
    eos = _eos_id(tok)
    if fmt == "chat" and not getattr(tok, "chat_template", None):
        raise SpecError(
            "the tokenizer has no chat template (ensure_chat_template sets a default)",
            field="model.path",
        )
    rows: list[Row] = []
    truncated: list[int] = []
    for example in examples:
        ids, labels = _encode_one(tok, example, fmt, loss_on, eos)
        if packing and ids[-1] != eos:
            # the separator between packed examples: trained only where everything is
            ids, labels = [*ids, eos], [*labels, eos if loss_on == "all" else IGNORE]
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            truncated.append(example.line)
        if all(label == IGNORE for label in labels[1:]):
            raise DataError(
                f"line {example.line}: longer than max_length {max_length} with nothing "
                "left to train on",
                field="data.source",
            )
        rows.append((ids, labels))
    if packing:
        rows = _pack(rows, max_length)
    return _pad(rows, _pad_id(tok, eos), truncated)


def prompt_ids(
    tok: PreTrainedTokenizerBase, prompt: str | Sequence[Message], *, chat: bool
) -> list[int]:
    """The token ids generation feeds the model for ``prompt``.

    ``chat=True``: the chat template with ``add_generation_prompt=True`` (a string is one
    user message). ``chat=False``: the raw prompt's tokens, with BOS where the tokenizer
    adds one -- exactly how completion and text examples are tokenized for training.
    """
    if chat:
        messages = [Message(role="user", content=prompt)] if isinstance(prompt, str) else prompt
        return _tokens(tok, _render(tok, messages, generation=True), special=False)
    if not isinstance(prompt, str):
        raise DataError("a completion prompt is a string, not a list of messages", field="prompt")
    return _tokens(tok, prompt, special=True)


# --- one example -------------------------------------------------------------------


def _encode_one(
    tok: PreTrainedTokenizerBase, example: Example, fmt: LMFormat, loss_on: LossOn, eos: int
) -> Row:
    """(ids, labels) of one example, before truncation."""
    if fmt == "chat":
        if example.messages is None:
            raise DataError(f"line {example.line}: not a chat example", field="data.source")
        return _encode_chat(tok, example.messages, example.line, loss_on)
    if fmt == "completion":
        if example.prompt is None or example.completion is None:
            raise DataError(f"line {example.line}: not a completion example", field="data.source")
        # a tokenizer that adds EOS itself (add_eos_token) must not end the prompt with it
        head = _without_eos(_tokens(tok, example.prompt, special=True), eos)
        tail = [*_tokens(tok, example.completion, special=False), eos]
        masked = head if loss_on == "all" else [IGNORE] * len(head)
        return [*head, *tail], [*masked, *tail]
    if example.text is None:
        raise DataError(f"line {example.line}: not a text example", field="data.source")
    ids = [*_without_eos(_tokens(tok, example.text, special=True), eos), eos]
    return ids, list(ids)


def _without_eos(ids: list[int], eos: int) -> list[int]:
    """``ids`` without the EOS some tokenizers append to every encoding."""
    return ids[:-1] if ids and ids[-1] == eos else ids


def _encode_chat(
    tok: PreTrainedTokenizerBase, messages: Sequence[Message], line: int, loss_on: LossOn
) -> Row:
    full = _render(tok, messages, generation=False)
    ids = _tokens(tok, full, special=False)
    if loss_on == "all":
        return ids, list(ids)
    spans = _assistant_spans(tok, messages, full, line)
    trained = _spans_by_prefix(tok, full, ids, spans)
    if trained is None:
        trained = _spans_by_offsets(tok, full, ids, spans, line)
    labels = [t if keep else IGNORE for t, keep in zip(ids, trained, strict=True)]
    return ids, labels


def _assistant_spans(
    tok: PreTrainedTokenizerBase, messages: Sequence[Message], full: str, line: int
) -> list[Span]:
    """[start, end) in ``full`` of each assistant turn: content + the template's end of turn."""
    spans: list[Span] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = _render(tok, messages[:i], generation=True) if i else None
        after = _render(tok, messages[: i + 1], generation=False)
        if before is not None and full.startswith(before) and full.startswith(after):
            start, end = len(before), len(after)
        else:
            # The template renders earlier turns differently once later turns follow
            # (or cannot render a chat that starts with an assistant turn): find the
            # turn's text -- content plus end-of-turn where the prefixes agree -- instead.
            turn = _turn_text(message.content, before, after)
            start = full.find(turn, cursor)
            if start < 0:
                turn = message.content
                start = full.find(turn, cursor)
            if start < 0:
                raise DataError(
                    f"line {line}: cannot find assistant turn {i + 1} in the chat template's "
                    "rendering, so its tokens cannot be told from the prompt's",
                    field="data.source",
                )
            end = start + len(turn)
        if end <= start:
            raise DataError(
                f"line {line}: the chat template renders assistant turn {i + 1} as nothing",
                field="data.source",
            )
        spans.append((start, end))
        cursor = end
    return spans


def _turn_text(content: str, before: str | None, after: str) -> str:
    """An assistant turn's rendered text: its content and the end of turn after it."""
    if before is not None and after.startswith(before):
        return after[len(before) :]
    at = after.rfind(content)  # the turn is the last thing ``after`` renders
    return after[at:] if at >= 0 else content


def _spans_by_prefix(
    tok: PreTrainedTokenizerBase, full: str, ids: list[int], spans: list[Span]
) -> list[bool] | None:
    """Trained flags per token from tokenized prefixes; None where a prefix's tokens differ."""
    trained = [False] * len(ids)
    for start, end in spans:
        first = _prefix_length(tok, full[:start], ids)
        last = _prefix_length(tok, full[:end], ids)
        if first is None or last is None or last <= first:
            return None
        trained[first:last] = [True] * (last - first)
    return trained


def _prefix_length(tok: PreTrainedTokenizerBase, prefix: str, ids: list[int]) -> int | None:
    head = _tokens(tok, prefix, special=False) if prefix else []
    return len(head) if ids[: len(head)] == head else None


def _spans_by_offsets(
    tok: PreTrainedTokenizerBase, full: str, ids: list[int], spans: list[Span], line: int
) -> list[bool]:
    """Trained flags per token: a token whose characters overlap an assistant span."""
    try:
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):
        enc = None
    offsets = None if enc is None else enc.get("offset_mapping")
    if offsets is None or list(enc["input_ids"]) != ids:
        raise DataError(
            f"line {line}: the tokenizer splits the chat so that assistant turns cannot be "
            "told apart (tokenized prefixes differ and no offsets mapping is available)",
            field="data.source",
        )
    trained = [any(a < end and b > start for start, end in spans) for a, b in offsets]
    if sum(trained) == 0:
        raise DataError(f"line {line}: no token falls in an assistant turn", field="data.source")
    return trained


# --- rows ----------------------------------------------------------------------------


def _pack(rows: list[Row], max_length: int) -> list[Row]:
    """Whole examples, in order, into rows of at most ``max_length`` tokens (next fit)."""
    packed: list[Row] = []
    ids: list[int] = []
    labels: list[int] = []
    for row_ids, row_labels in rows:
        if ids and len(ids) + len(row_ids) > max_length:
            packed.append((ids, labels))
            ids, labels = [], []
        ids, labels = [*ids, *row_ids], [*labels, *row_labels]
    packed.append((ids, labels))
    return packed


def _pad(rows: list[Row], pad_id: int, truncated: list[int]) -> Encoded:
    width = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # (N, L)
    mask = np.zeros((len(rows), width), dtype=np.int64)  # (N, L)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)  # (N, L)
    for r, (ids, row_labels) in enumerate(rows):
        input_ids[r, : len(ids)] = ids
        mask[r, : len(ids)] = 1
        labels[r, : len(ids)] = row_labels
    return Encoded(
        input_ids=input_ids,
        attention_mask=mask,
        labels=labels,
        truncated=truncated,
        tokens=int(mask.sum()),
        trained_tokens=int((labels != IGNORE).sum()),
    )


# --- tokenizer helpers ---------------------------------------------------------------


def _render(tok: PreTrainedTokenizerBase, messages: Sequence[Message], *, generation: bool) -> str:
    turns = [{"role": m.role, "content": m.content} for m in messages]
    try:
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)
    except Exception as exc:  # jinja2 raises its own error types (TemplateError, ...)
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise DataError(
            f"the tokenizer's chat template failed: {reason}",
            field="data.source",
        ) from None
    if not isinstance(text, str):
        raise DataError("the chat template did not render to text", field="data.source")
    return text


def _tokens(tok: PreTrainedTokenizerBase, text: str, *, special: bool) -> list[int]:
    return [int(i) for i in tok(text, add_special_tokens=special)["input_ids"]]


def _eos_id(tok: PreTrainedTokenizerBase) -> int:
    eos = tok.eos_token_id
    if not isinstance(eos, int):
        raise SpecError("the tokenizer has no EOS token", field="model.path")
    return eos


def _pad_id(tok: PreTrainedTokenizerBase, eos: int) -> int:
    pad = tok.pad_token_id
    return pad if isinstance(pad, int) else eos  # no pad token: EOS pads (masked, unlabelled)
