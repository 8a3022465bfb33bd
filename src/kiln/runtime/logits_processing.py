"""Per-sequence logits processing: structured output, OpenAI's penalties, logprobs.

A :class:`SequenceProcessor` belongs to one sequence being decoded (made from its
:class:`~kiln.runtime.generation.SamplingParams` when :func:`needs_processing`). Each
step it turns the model's last-position logits (V,) into the logits the token is
sampled from, in this order:

1. OpenAI's penalties over the tokens generated so far (the prompt does not count):
   ``logits[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty``
   (:func:`apply_penalties`);
2. the grammar mask (``json_schema``): tokens the llguidance matcher does not allow
   next get ``-inf``; the matcher advances with each accepted token, and the sequence
   ends (:attr:`SequenceProcessor.stopped`) once the grammar admits no further token.
   The end-of-sequence token is allowed exactly when the grammar accepts the text.

Log-probabilities (``SamplingParams.logprobs``) are ``log_softmax`` of these PROCESSED
logits at temperature 1: penalties and the grammar apply, temperature and top_p do not
(so a greedy sequence without penalties or grammar gets the model's own
log-probabilities, and a forbidden token never shows up as an alternative).

JSON schemas are compiled by llguidance (the library onnxruntime-genai uses for its
own guidance, so both engines enforce the same grammar); :func:`json_schema_text`
adds the compact-whitespace option both read from the schema's ``x-guidance``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kiln.errors import DataError

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer
    from transformers import PreTrainedTokenizerBase

    from kiln.runtime.generation import SamplingParams

MAX_PENALTY = 2.0  # OpenAI's range for presence/frequency penalties: [-2, 2]
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
# llguidance's JSON options: compact output (no free whitespace between tokens, which a
# weak model would fill up to max_tokens); a schema's own "x-guidance" wins.
GRAMMAR_OPTIONS: dict[str, object] = {"whitespace_flexible": False}


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token: its text (UTF-8 of its bytes, a partial character as
    U+FFFD), its raw bytes, and its log-probability."""

    token: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the ``top`` most likely alternatives
    (best first, at most ``SamplingParams.logprobs``; the chosen one may be among them)."""

    token: str
    bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


def needs_processing(params: SamplingParams) -> bool:
    """Whether a sequence needs a :class:`SequenceProcessor` (else its logits are
    sampled as the model gave them)."""
    return bool(
        params.json_schema is not None
        or params.presence_penalty
        or params.frequency_penalty
        or params.logprobs is not None
    )


def check_processing(params: SamplingParams) -> None:
    """Refuse penalties, logprobs or a schema out of range (DataError naming the field)."""
    for name, value in (
        ("presence_penalty", params.presence_penalty),
        ("frequency_penalty", params.frequency_penalty),
    ):
        if not -MAX_PENALTY <= value <= MAX_PENALTY:
            raise DataError(f"{name} must be in [-2, 2]", field=name)
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
        raise DataError(f"logprobs must be in [0, {MAX_LOGPROBS}]", field="logprobs")
    if params.json_schema is not None:
        check_json_schema(params.json_schema)


def json_schema_text(schema: Mapping[str, object]) -> str:
    """A JSON schema as the text both engines compile, with :data:`GRAMMAR_OPTIONS`
    under ``x-guidance`` unless the schema sets its own."""
    with_options = dict(schema)
    own = with_options.get("x-guidance")
    options = dict(own) if isinstance(own, Mapping) else {}
    with_options["x-guidance"] = {**GRAMMAR_OPTIONS, **options}
    return json.dumps(with_options)


def check_json_schema(schema: str) -> None:
    """A DataError (field ``json_schema``) with llguidance's reason when ``schema`` is no
    JSON schema it can enforce (bad JSON, unknown types, unsupported keywords)."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema)
    except (ValueError, TypeError) as exc:  # not JSON at all
        raise DataError(f"the JSON schema cannot be read: {exc}", field="json_schema") from None
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        reason = messages[0] if messages else "invalid"
        raise DataError(f"the JSON schema cannot be enforced: {reason}", field="json_schema")


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: ``logits - counts * frequency - (counts > 0) * presence``;
    logits and counts (V,), counts = times each token was generated so far."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


class TokenBridge:
    """A transformers tokenizer as llguidance sees it (built once, on first use: about a
    second for a large vocabulary) and each token's bytes, for logprob records."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self._ll: LLTokenizer | None = None

    @property
    def ll(self) -> LLTokenizer:
        """The llguidance tokenizer (DataError for a slow, Python-only tokenizer)."""
        if self._ll is None:
            from llguidance.hf import from_tokenizer
            from transformers import PreTrainedTokenizerFast

            if not isinstance(self.tokenizer, PreTrainedTokenizerFast):
                raise DataError(
                    "structured output needs a fast (tokenizers) tokenizer", field="json_schema"
                )
            eos = sorted(self.eos_ids) or None
            try:
                self._ll = from_tokenizer(self.tokenizer, eos_token=eos)
            except ValueError as exc:  # a tokenizer llguidance cannot read (WordLevel, ...)
                raise DataError(
                    f"structured output is not available for this model's tokenizer: {exc}",
                    field="json_schema",
                ) from None
        return self._ll

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (a byte-level token may hold part of a
        character)."""
        from transformers import PreTrainedTokenizerFast

        if isinstance(self.tokenizer, PreTrainedTokenizerFast):
            return self.ll.decode_bytes([token_id])
        text = self.tokenizer.decode([token_id])
        return (text if isinstance(text, str) else "".join(text)).encode()

    def top(self, token_id: int, logprob: float) -> TopLogprob:
        raw = self.token_bytes(token_id)
        return TopLogprob(raw.decode("utf-8", errors="replace"), raw, logprob)


class SequenceProcessor:
    """The logits processing of one sequence (see the module docstring). Call
    :meth:`process` on each step's logits (V,), sample from the result, then
    :meth:`accept` the token; :meth:`record` gives its logprob record when asked for."""

    def __init__(self, params: SamplingParams, bridge: TokenBridge) -> None:
        self.params = params
        self.bridge = bridge
        self._counts: torch.Tensor | None = None  # (V,) float: times generated
        self._matcher: LLMatcher | None = None
        if params.json_schema is not None:
            self._matcher = _matcher(bridge.ll, params.json_schema)
        self.stopped = False  # the grammar admits no further token

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed float32 logits (V,) for the next token (a new tensor)."""
        out = logits.float().clone()
        p = self.params
        if self._counts is not None and (p.presence_penalty or p.frequency_penalty):
            out = apply_penalties(out, self._counts, p.presence_penalty, p.frequency_penalty)
        if self._matcher is not None:
            # the logits' width V may exceed the tokenizer's vocabulary (padded embeddings)
            allowed = _allowed(self._matcher, out.shape[-1])
            out = out.masked_fill(~torch.from_numpy(allowed).to(out.device), float("-inf"))
        return out

    def accept(self, token_id: int, processed: torch.Tensor) -> None:
        """Count the sampled token and advance the grammar (``processed`` is what it was
        sampled from: an empty mask, a grammar in error, ends the sequence)."""
        if self._counts is None:
            self._counts = torch.zeros_like(processed)  # (V,) float32
        self._counts[token_id] += 1
        if self._matcher is None:
            return
        if not torch.isfinite(processed[token_id]) or not self._matcher.consume_token(token_id):
            self.stopped = True  # nothing allowed was left: the grammar is done or broken
            return
        self.stopped = self._matcher.is_stopped()

    def record(self, token_id: int, processed: torch.Tensor) -> TokenLogprob | None:
        """The token's logprob record (None: logprobs not asked for, or an eos id)."""
        k = self.params.logprobs
        if k is None or token_id in self.bridge.eos_ids:
            return None
        logprobs = torch.log_softmax(processed, dim=-1)  # (V,) at temperature 1
        chosen = self.bridge.top(token_id, float(logprobs[token_id]))
        top: tuple[TopLogprob, ...] = ()
        if k:
            values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
            top = tuple(
                self.bridge.top(int(i), float(v))
                for v, i in zip(values.tolist(), ids.tolist(), strict=True)
                if v != float("-inf")  # fewer tokens allowed than asked for
            )
        return TokenLogprob(chosen.token, chosen.bytes, chosen.logprob, top)


def _matcher(tokenizer: LLTokenizer, schema: str) -> LLMatcher:
    from llguidance import LLMatcher

    grammar = LLMatcher.grammar_from_json_schema(schema)
    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise DataError(
            f"the JSON schema cannot be enforced: {matcher.get_error()}", field="json_schema"
        )
    return matcher


def _allowed(matcher: LLMatcher, vocab: int) -> np.ndarray:
    """The matcher's next-token mask as bools (vocab,): one bit per tokenizer token,
    little-endian within each byte; logits past the tokenizer's vocabulary are never
    allowed."""
    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    allowed = np.unpackbits(bits, bitorder="little").astype(bool)
    if allowed.shape[0] >= vocab:
        return np.ascontiguousarray(allowed[:vocab])
    return np.concatenate([allowed, np.zeros(vocab - allowed.shape[0], dtype=bool)])
