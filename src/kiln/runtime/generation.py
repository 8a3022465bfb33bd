"""Text generation for causal LMs: sampling parameters, streams and the torch decoder.

A :class:`Generator` turns prompt token ids (see ``kiln.data.lm_encode.prompt_ids``) into
text, streamed as deltas (:meth:`Generator.stream`) or as a batch of completions
(:meth:`Generator.generate`). Two implement it: :class:`TorchGenerator` here (its own
decode loop over a transformers model with a KV cache) and
``kiln.runtime.genai.GenaiGenerator`` (onnxruntime-genai). Both share
:class:`TextDecoder`, which owns the stop rules and the incremental detokenization, so
they stop and stream the same way:

- an end-of-sequence id (``SamplingParams.eos_ids``, default the tokenizer's and the
  model's) ends with ``finish_reason`` ``"stop"``;
- a stop string ends with ``"stop"`` and the text is cut before it (a stop string is
  never streamed: a tail that could begin one is held back until it cannot);
- ``max_new_tokens`` ends with ``"length"``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from kiln.errors import DataError

FinishReason = Literal["stop", "length"]

# An incomplete UTF-8 character decodes to the replacement character; it is held back
# until the next token completes it.
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: ``temperature`` 0 is greedy, otherwise temperature + nucleus
    (``top_p``) sampling seeded by ``seed`` (same seed, same text; None draws a fresh
    one). ``eos_ids`` empty means the tokenizer's and the model's end-of-sequence ids.

    Applied by the serving decoders (``kiln.runtime.batch_decode``, see
    ``kiln.runtime.logits_processing``), not by :meth:`Generator.generate`: OpenAI's
    ``presence_penalty``/``frequency_penalty`` (in [-2, 2]; 0 is off), ``json_schema``
    (the text of a JSON schema the output must match; None is free text) and
    ``logprobs`` (None: none; k: each token's log-probability and its top k)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    json_schema: str | None = None
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Completion:
    """One generated answer. ``token_ids`` are the tokens generated, including the
    end-of-sequence id or the token that completed a stop string; ``text`` is their
    decoding without special tokens, cut before a stop string. ``first_token_s`` is the
    time from the start of generation to the first token (prefill), when measured."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    first_token_s: float | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class TextDecoder:
    """Incremental detokenization with stop rules, one per sequence being generated.

    :meth:`push` takes each new token id and returns the text that may be streamed now
    (possibly empty); once :attr:`finish` is set the sequence is done. Each call
    decodes all generated ids (exact for any tokenizer, and cheap for a few hundred
    tokens with a fast tokenizer) and yields the new suffix, holding back a trailing
    incomplete character and any tail that could begin a stop string.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        params: SamplingParams,
        eos_ids: frozenset[int],
        prompt_tokens: int,
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in params.stop if s)
        self._eos = eos_ids
        self._max_new = params.max_new_tokens
        self.prompt_tokens = prompt_tokens
        self.token_ids: list[int] = []
        self._text_ids: list[int] = []  # token_ids without the end-of-sequence id
        self._text = ""
        self._emitted = 0  # characters of _text already streamed
        self.finish: FinishReason | None = None
        self.first_token_s: float | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def push(self, token_id: int) -> str:
        """Add one generated token; the text delta to stream now."""
        if self.finish is not None:
            return ""
        self.token_ids.append(token_id)
        if token_id in self._eos:
            return self._end("stop")
        self._text_ids.append(token_id)
        text = self._tokenizer.decode(self._text_ids, skip_special_tokens=True)
        self._text = text if isinstance(text, str) else "".join(text)
        cut = self._stop_at()
        if cut is not None:
            self._text = self._text[:cut]
            return self._end("stop")
        if len(self.token_ids) >= self._max_new:
            return self._end("length")
        safe = len(self._text) - self._held_back()
        return self._advance(safe)

    def end(self, reason: FinishReason) -> str:
        """Finish (the backend stopped: length or its own end of sequence); the rest."""
        if self.finish is not None:
            return ""
        return self._end(reason)

    def completion(self) -> Completion:
        """The finished completion (call once :attr:`done`)."""
        if self.finish is None:
            raise RuntimeError("the generation has not finished")
        return Completion(
            self._text, list(self.token_ids), self.finish, self.prompt_tokens, self.first_token_s
        )

    def _end(self, reason: FinishReason) -> str:
        self.finish = reason
        return self._advance(len(self._text))

    def _advance(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        delta = self._text[self._emitted : upto]
        self._emitted = upto
        return delta

    def _stop_at(self) -> int | None:
        """Where the earliest stop string begins in the text, or None."""
        # Only the unstreamed tail (plus a stop's length of overlap) can hold a new match.
        start = max(0, self._emitted - max((len(s) for s in self._stop), default=0))
        hits = [i for s in self._stop if (i := self._text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Characters at the end of the text not to stream yet."""
        text = self._text
        held = len(text) - len(text.rstrip(_REPLACEMENT))
        visible = text[: len(text) - held]
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(visible)), 0, -1):
                if visible.endswith(stop[:n]):
                    held = max(held, len(text) - len(visible) + n)
                    break
        return held


@dataclass
class TokenStream(Iterator[str]):
    """Text deltas of one generation, as they are decoded. After exhaustion
    :attr:`completion` holds the whole result. :meth:`close` (or dropping the stream)
    stops the generation at its next step."""

    _deltas: Iterator[str]
    _decoder: TextDecoder
    _closed: bool = field(default=False, init=False)

    def __next__(self) -> str:
        if self._closed:
            raise StopIteration
        return next(self._deltas)

    def close(self) -> None:
        """Stop generating; no work is done after the current step."""
        self._closed = True
        close = getattr(self._deltas, "close", None)
        if close is not None:
            close()

    @property
    def generated(self) -> int:
        """Tokens generated so far (the end-of-sequence id included once produced)."""
        return len(self._decoder.token_ids)

    @property
    def completion(self) -> Completion:
        """The finished completion; RuntimeError before the stream is exhausted."""
        return self._decoder.completion()


class Generator(Protocol):
    """A text generator over prompt token ids."""

    name: str

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> TokenStream:
        """Stream one completion of ``prompt_ids`` as text deltas."""
        ...

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        """Complete a batch of prompts (greedy results equal one-by-one generation)."""
        ...


def eos_ids_of(
    tokenizer: PreTrainedTokenizerBase, params: SamplingParams, *extra: object
) -> frozenset[int]:
    """``params.eos_ids``, or else the tokenizer's eos id and every id in ``extra``
    (an int, a list of ints or None: a model config's ``eos_token_id``)."""
    if params.eos_ids:
        return frozenset(params.eos_ids)
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, *extra):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def check_params(params: SamplingParams) -> None:
    """Refuse parameters no backend can honour (a DataError naming the field)."""
    if params.max_new_tokens < 1:
        raise DataError("max_new_tokens must be at least 1", field="max_new_tokens")
    if params.temperature < 0:
        raise DataError("temperature must be >= 0", field="temperature")
    if not 0.0 < params.top_p <= 1.0:
        raise DataError("top_p must be in (0, 1]", field="top_p")


def check_plain(params: SamplingParams) -> None:
    """Refuse what only the serving engine applies (penalties, JSON schemas, logprobs:
    ``kiln.serve.engine``): the library's one-shot generators would ignore them."""
    given = {
        "presence_penalty": params.presence_penalty != 0,
        "frequency_penalty": params.frequency_penalty != 0,
        "json_schema": params.json_schema is not None,
        "logprobs": params.logprobs is not None,
    }
    for name, on in given.items():
        if on:
            raise DataError(
                f"{name} is applied by the serving engine (kiln serve, the /v1 routes), "
                "not by this generator",
                field=name,
            )


def within_context(
    params: SamplingParams, prompt_tokens: int, context: int | None
) -> SamplingParams:
    """``params`` with max_new_tokens cut to what the model's ``context`` leaves after the
    longest prompt; a prompt that fills the context is a DataError."""
    if context is None:
        return params
    if prompt_tokens >= context:
        raise DataError(
            f"the prompt has {prompt_tokens} tokens; the model's context is {context}",
            field="prompt",
        )
    room = context - prompt_tokens
    return params if params.max_new_tokens <= room else replace(params, max_new_tokens=room)


def sample_next(
    logits: torch.Tensor, params: SamplingParams, rng: torch.Generator | None
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax when greedy, else
    temperature + nucleus sampling drawn from ``rng``."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (B, V)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the mass before it already reaches top_p (the top one stays).
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


class TorchGenerator:
    """Generation on a transformers causal LM with its own KV-cache decode loop, on the
    model's device. Greedy output equals ``model.generate(do_sample=False)`` with the
    model's default (unprocessed) logits."""

    name = "torch"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        model.train(False)
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        positions = getattr(model.config, "max_position_embeddings", None)
        self.context = int(positions) if isinstance(positions, int) else None

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> TokenStream:
        """Stream one completion (see :class:`TokenStream`)."""
        check_params(params)
        check_plain(params)
        prompt = list(prompt_ids)
        params = within_context(params, len(prompt), self.context)
        decoder = TextDecoder(self.tokenizer, params, self._eos(params), len(prompt))
        return TokenStream(self._stream_steps(prompt, params, decoder), decoder)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        """Complete a left-padded batch in one decode loop; seeded sampling one prompt at
        a time, so a seed gives a prompt the same text in a batch as alone."""
        check_params(params)
        check_plain(params)
        rows = [list(p) for p in prompts]
        if len(rows) > 1 and params.seed is not None and not params.greedy:
            return [self.generate([row], params)[0] for row in rows]
        eos = self._eos(params)
        # each row's own budget: a prompt's answer does not depend on its batch-mates
        decoders = [
            TextDecoder(self.tokenizer, within_context(params, len(r), self.context), eos, len(r))
            for r in rows
        ]
        for _ in self._decode(rows, params, decoders):
            pass
        return [d.completion() for d in decoders]

    def _stream_steps(
        self, prompt: list[int], params: SamplingParams, dec: TextDecoder
    ) -> Iterator[str]:
        for deltas in self._decode([prompt], params, [dec]):
            if deltas[0]:
                yield deltas[0]

    def _eos(self, params: SamplingParams) -> frozenset[int]:
        gen_config = getattr(self.model, "generation_config", None)
        return eos_ids_of(
            self.tokenizer,
            params,
            getattr(gen_config, "eos_token_id", None),
            getattr(self.model.config, "eos_token_id", None),
        )

    def _decode(
        self, rows: list[list[int]], params: SamplingParams, decoders: list[TextDecoder]
    ) -> Iterator[list[str]]:
        """The decode loop: yields each step's text deltas (one per row) until every
        row is done. Closing it stops before the next forward pass."""
        if any(not r for r in rows):
            raise DataError("a prompt must have at least one token", field="prompt")
        rng = None
        if params.seed is not None and not params.greedy:
            rng = torch.Generator(device=self.device).manual_seed(params.seed)
        width = max(len(r) for r in rows)
        # Left padding keeps every row's last prompt token in the final column.
        ids = torch.tensor(
            [[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device
        )  # (B, T)
        mask = torch.tensor(
            [[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device
        )  # (B, T)
        cache = DynamicCache()
        start = time.perf_counter()
        step_ids = ids
        while True:
            # Positions count real tokens only, so padded rows see the same positions.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            if self.context is not None:
                # a row that is done may run on past its context while others finish;
                # its outputs are dropped, its positions must stay valid
                positions = positions.clamp(max=self.context - 1)
            with torch.inference_mode():
                out = self.model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                nxt = sample_next(out.logits[:, -1, :], params, rng)  # (B,)
            cache = out.past_key_values
            tokens = nxt.tolist()
            deltas = []
            for dec, tok in zip(decoders, tokens, strict=True):
                if dec.first_token_s is None:
                    dec.first_token_s = time.perf_counter() - start
                deltas.append(dec.push(int(tok)))
            yield deltas
            if all(d.done for d in decoders):
                return
            # Finished rows keep decoding padding (their output is ignored).
            step = [self.pad_id if d.done else t for d, t in zip(decoders, tokens, strict=True)]
            step_ids = torch.tensor(step, device=self.device).unsqueeze(-1)  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=-1)
