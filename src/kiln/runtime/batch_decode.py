"""Step-wise batched decoding: the backend half of continuous (iteration-level) batching.

A :class:`BatchDecoder` holds the sequences being generated. The scheduler
(``kiln.serve.engine``) :meth:`~BatchDecoder.add`\\ s a sequence between steps, calls
:meth:`~BatchDecoder.step` to get one new token for every running sequence, and
:meth:`~BatchDecoder.remove`\\ s a sequence the moment it is finished or cancelled; the
text side (stop strings, eos, UTF-8-safe deltas) stays in one
:class:`~kiln.runtime.generation.TextDecoder` per sequence, made by
:meth:`~BatchDecoder.text_decoder` with the backend's end-of-sequence ids and context.

Two implement it:

- :class:`TorchBatchDecoder` over a transformers causal LM: one left-padded batch with a
  ``DynamicCache``; a new sequence is prefilled on its own cache (in chunks of
  ``prefill_chunk`` tokens, one chunk budget per step, so a long prompt does not stall
  the running rows) and merged into the batch once its prompt is in. Greedy output equals
  :meth:`TorchGenerator.generate` of the prompt alone; a seed draws from the sequence's own
  ``torch.Generator``, so it gives the same text in a batch as alone. A sequence whose
  params ask for penalties, a JSON schema or logprobs has its own
  :class:`~kiln.runtime.logits_processing.SequenceProcessor` over its row's logits
  (the other rows' logits are sampled untouched); a grammar that admits no further
  token ends the sequence (:meth:`~BatchDecoder.ended`, ``"stop"``).
- :class:`GenaiBatchDecoder` over onnxruntime-genai's ``og.Engine`` (its own continuous
  batching and prefill scheduling); a request per sequence, added between ``run`` calls.
  A JSON schema is enforced by the engine's own guidance (llguidance, the same grammar);
  penalties and logprobs are refused there (its engine has neither).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.nn import functional
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from kiln.errors import BundleError, DataError
from kiln.runtime.generation import (
    FinishReason,
    SamplingParams,
    TextDecoder,
    check_params,
    eos_ids_of,
    sample_next,
    within_context,
)
from kiln.runtime.logits_processing import (
    SequenceProcessor,
    TokenBridge,
    TokenLogprob,
    check_processing,
    needs_processing,
)

if TYPE_CHECKING:
    import onnxruntime_genai as og

    from kiln.runtime.genai import GenaiGenerator


class BatchDecoder(Protocol):
    """A batch of sequences decoded one token per :meth:`step`.

    Sequence ids are the caller's; :meth:`add` of an id already present is an error.
    All calls come from one thread (the scheduler's)."""

    tokenizer: PreTrainedTokenizerBase
    context: int | None  # the model's context in tokens (prompt + generated), if bounded

    def prepare(self, prompt_ids: Sequence[int], params: SamplingParams) -> SamplingParams:
        """``params`` checked and cut to the model's context for this prompt (DataError
        naming the field when the prompt or a parameter cannot be served)."""
        ...

    def text_decoder(self, prompt_ids: Sequence[int], params: SamplingParams) -> TextDecoder:
        """The sequence's TextDecoder: the backend's eos ids, ``prepare``\\ d params."""
        ...

    def add(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        """Start a sequence (``params`` as :meth:`prepare` returned them); its prompt is
        prefilled over the following steps and its first token comes from one of them."""
        ...

    def step(self) -> list[tuple[int, int]]:
        """Run one decode step: ``(seq_id, token id)`` for every sequence that made one."""
        ...

    def ended(self) -> list[tuple[int, FinishReason]]:
        """Sequences the backend ended on its own since the last call (its length cap,
        a grammar that admits no further token after the last one); the caller ends
        their text and removes them."""
        ...

    def logprobs(self) -> dict[int, TokenLogprob]:
        """The last :meth:`step`'s logprob records by sequence, for sequences whose
        params ask for ``logprobs`` (an end-of-sequence token has none)."""
        ...

    def remove(self, seq_id: int) -> None:
        """Drop a sequence (finished or cancelled) and free its cache; unknown ids are
        ignored."""
        ...

    def active(self) -> int:
        """Sequences held: decoding or still prefilling."""
        ...

    def kv_tokens(self) -> int:
        """Tokens held in the KV cache: prompt and generated tokens of every sequence."""
        ...


@dataclass
class _Row:
    """A sequence in the decode batch."""

    seq_id: int
    params: SamplingParams
    rng: torch.Generator | None
    proc: SequenceProcessor | None  # None: logits sampled as the model gave them
    next_id: int  # the last sampled token: the next step's input


@dataclass
class _Prefill:
    """A sequence whose prompt is going in, chunk by chunk, on a cache of its own."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    rng: torch.Generator | None
    proc: SequenceProcessor | None
    done: int = 0  # prompt tokens already in ``cache``
    cache: DynamicCache = field(default_factory=DynamicCache)


class TorchBatchDecoder:
    """Continuous batching over a transformers causal LM (see the module docstring).

    The batch is one ``DynamicCache`` with keys/values (B, H, T, D) per layer and an
    attention mask (B, T): each row's tokens sit right-aligned (left padding), so every
    row's newest token is in the last column. A sequence that joins is padded on the
    left (or the batch is) to the common width and concatenated along the batch axis;
    removal selects the remaining rows and drops the leading columns that are padding for
    every row. Positions count each row's real tokens, so padding never shifts them.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        prefill_chunk: int = 256,
    ) -> None:
        if prefill_chunk < 1:
            raise DataError("prefill_chunk must be at least 1", field="prefill_chunk")
        self.model = model
        model.train(False)
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        positions = getattr(model.config, "max_position_embeddings", None)
        self.context = int(positions) if isinstance(positions, int) else None
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (B, T)
        self._prefills: list[_Prefill] = []
        self._bridge: TokenBridge | None = None  # made for the first processed sequence
        self._ended: list[tuple[int, FinishReason]] = []
        self._logprobs: dict[int, TokenLogprob] = {}

    # -- the protocol ------------------------------------------------------------------

    def prepare(self, prompt_ids: Sequence[int], params: SamplingParams) -> SamplingParams:
        check_params(params)
        check_processing(params)
        if not prompt_ids:
            raise DataError("a prompt must have at least one token", field="prompt")
        return within_context(params, len(prompt_ids), self.context)

    def text_decoder(self, prompt_ids: Sequence[int], params: SamplingParams) -> TextDecoder:
        return TextDecoder(self.tokenizer, params, self._eos(params), len(prompt_ids))

    def add(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        if self._find(seq_id):
            raise DataError(f"sequence {seq_id} is already decoding", field="seq_id")
        if not prompt_ids:
            raise DataError("a prompt must have at least one token", field="prompt")
        rng = None
        if params.seed is not None and not params.greedy:
            rng = torch.Generator(device=self.device).manual_seed(params.seed)
        proc = None
        if needs_processing(params):
            proc = SequenceProcessor(params, self._token_bridge())
        self._prefills.append(_Prefill(seq_id, list(prompt_ids), params, rng, proc))

    def step(self) -> list[tuple[int, int]]:
        """Decode the running rows one token, then spend up to ``prefill_chunk`` prompt
        tokens on the waiting prefills (oldest first); a prompt that is complete yields
        its first token and joins the batch for the next step."""
        out: list[tuple[int, int]] = []
        self._logprobs = {}
        with torch.inference_mode():
            if self._rows:
                out.extend(self._decode_step())
            budget = self.prefill_chunk
            while self._prefills and budget > 0:
                pre = self._prefills[0]
                n = min(budget, len(pre.prompt) - pre.done)
                budget -= n
                token = self._prefill_chunk(pre, n)
                if token is not None:
                    self._prefills.pop(0)
                    self._join(pre, token)
                    out.append((pre.seq_id, token))
        return out

    def ended(self) -> list[tuple[int, FinishReason]]:
        done, self._ended = self._ended, []  # grammars that admit no further token
        return done

    def logprobs(self) -> dict[int, TokenLogprob]:
        return self._logprobs

    def remove(self, seq_id: int) -> None:
        self._prefills = [p for p in self._prefills if p.seq_id != seq_id]
        self._ended = [e for e in self._ended if e[0] != seq_id]
        keep = [i for i, r in enumerate(self._rows) if r.seq_id != seq_id]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache, self._mask = None, self._mask[:0, :0]
            return
        index = torch.tensor(keep, device=self.device)
        assert self._cache is not None
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._trim()

    def active(self) -> int:
        return len(self._rows) + len(self._prefills)

    def kv_tokens(self) -> int:
        return int(self._mask.sum()) + sum(p.done for p in self._prefills)

    # -- internals ---------------------------------------------------------------------

    def _eos(self, params: SamplingParams) -> frozenset[int]:
        gen_config = getattr(self.model, "generation_config", None)
        return eos_ids_of(
            self.tokenizer,
            params,
            getattr(gen_config, "eos_token_id", None),
            getattr(self.model.config, "eos_token_id", None),
        )

    def _token_bridge(self) -> TokenBridge:
        """The llguidance view of the tokenizer, with the model's own eos ids (a
        sequence's custom ``eos_ids`` end it in its TextDecoder; the grammar's eos stays
        the model's)."""
        if self._bridge is None:
            self._bridge = TokenBridge(self.tokenizer, self._eos(SamplingParams()))
        return self._bridge

    def _find(self, seq_id: int) -> bool:
        return any(r.seq_id == seq_id for r in self._rows) or any(
            p.seq_id == seq_id for p in self._prefills
        )

    def _decode_step(self) -> list[tuple[int, int]]:
        assert self._cache is not None
        ids = torch.tensor([[r.next_id] for r in self._rows], device=self.device)  # (B, 1)
        self._mask = torch.cat([self._mask, torch.ones_like(ids)], dim=-1)  # (B, T+1)
        positions = self._mask.sum(-1, keepdim=True) - 1  # (B, 1): real tokens before
        if self.context is not None:
            positions = positions.clamp(max=self.context - 1)
        out = self.model(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._cache = out.past_key_values
        tokens = self._sample(out.logits[:, -1, :], self._rows)
        for row, token in zip(self._rows, tokens, strict=True):
            row.next_id = token
        return [(r.seq_id, t) for r, t in zip(self._rows, tokens, strict=True)]

    def _sample(self, logits: torch.Tensor, rows: Sequence[_Row | _Prefill]) -> list[int]:
        """One token per row from last-position logits (B, V), each with its params
        (through the row's processor when it has one)."""
        picks = logits.argmax(dim=-1).tolist()  # (B,) the greedy rows' answer
        for i, row in enumerate(rows):
            if row.proc is not None:
                picks[i] = self._processed_pick(logits[i], row, row.proc)
            elif not row.params.greedy:
                picks[i] = int(sample_next(logits[i : i + 1], row.params, row.rng)[0])
        return [int(t) for t in picks]

    def _processed_pick(
        self, logits: torch.Tensor, row: _Row | _Prefill, proc: SequenceProcessor
    ) -> int:
        """Sample one row's token from its processed logits (V,); record its logprob
        and note a grammar that has ended."""
        processed = proc.process(logits)  # (V,) float32
        token = int(sample_next(processed.unsqueeze(0), row.params, row.rng)[0])
        record = proc.record(token, processed)
        if record is not None:
            self._logprobs[row.seq_id] = record
        proc.accept(token, processed)
        if proc.stopped:
            self._ended.append((row.seq_id, "stop"))
        return token

    def _prefill_chunk(self, pre: _Prefill, n: int) -> int | None:
        """Feed the next ``n`` prompt tokens; the first generated token once the prompt
        is complete, else None."""
        chunk = pre.prompt[pre.done : pre.done + n]
        ids = torch.tensor([chunk], device=self.device)  # (1, n)
        mask = torch.ones((1, pre.done + n), dtype=torch.long, device=self.device)
        positions = torch.arange(pre.done, pre.done + n, device=self.device).unsqueeze(0)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=pre.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        pre.cache = out.past_key_values
        pre.done += n
        if pre.done < len(pre.prompt):
            return None
        return self._sample(out.logits[:, -1, :], [pre])[0]

    def _join(self, pre: _Prefill, token: int) -> None:
        """Merge a prefilled sequence's cache (1, H, L, D) into the batch (B, H, T, D):
        left-pad the narrower one to max(T, L) along time, concatenate along batch."""
        row = _Row(pre.seq_id, pre.params, pre.rng, pre.proc, token)
        new_mask = torch.ones((1, pre.done), dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache, self._mask, self._rows = pre.cache, new_mask, [row]
            return
        width = max(self._mask.shape[1], pre.done)
        for old, new in zip(_layers(self._cache), _layers(pre.cache), strict=True):
            (old_k, old_v), (new_k, new_v) = _states(old), _states(new)
            old.keys = torch.cat([_left_pad(old_k, width), _left_pad(new_k, width)])
            old.values = torch.cat([_left_pad(old_v, width), _left_pad(new_v, width)])
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(new_mask, width)])
        self._rows.append(row)

    def _trim(self) -> None:
        """Drop leading columns that are padding for every row (after a removal)."""
        real = self._mask.sum(-1)  # (B,) real tokens per row, right-aligned
        drop = int(self._mask.shape[1] - real.max())
        if drop <= 0:
            return
        assert self._cache is not None
        for layer in _layers(self._cache):
            keys, values = _states(layer)
            layer.keys, layer.values = keys[:, :, drop:, :], values[:, :, drop:, :]
        self._mask = self._mask[:, drop:]


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers, each a full-attention DynamicLayer (the merge and trim edit
    their (B, H, T, D) keys/values; a sliding-window or quantized layer is refused)."""
    layers = list(cache.layers)
    for layer in layers:
        if type(layer) is not DynamicLayer:
            raise BundleError(
                f"continuous batching needs full-attention cache layers, not {type(layer).__name__}"
            )
    return layers  # type: ignore[return-value]  # checked above


def _states(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """A filled layer's keys and values, each (B, H, T, D)."""
    if layer.keys is None or layer.values is None:
        raise BundleError("a cache layer holds no keys: the model skipped the cache")
    return layer.keys, layer.values


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, width, D), zeros in front (masked out, never attended)."""
    return functional.pad(states, (0, 0, width - states.shape[2], 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T) -> (B, width), zeros in front."""
    return functional.pad(mask, (width - mask.shape[1], 0))


@dataclass
class _Request:
    """A sequence on the genai engine."""

    request: og.Request
    turn: int
    tokens: int  # prompt + generated


class GenaiBatchDecoder:
    """Continuous batching on onnxruntime-genai's ``og.Engine``: one request per sequence,
    begun between ``run`` calls; each :meth:`step` is one ``engine.run``. The engine does
    its own prefill scheduling and KV management. Seeds are not honoured per request (the
    CPU builder's engine has no paged attention; see ``kiln.runtime.genai``): a seeded
    sampled sequence is a DataError at :meth:`prepare`.

    onnxruntime-genai answers an ``og.Engine`` only on the thread that created it, so
    the engine is created by the first :meth:`add` (the scheduler's thread), not here."""

    def __init__(self, generator: GenaiGenerator) -> None:
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.context: int | None = generator.context_length
        self._og: Any = None  # (og.Engine, its event buffer), on the owner thread
        self._requests: dict[int, _Request] = {}
        self._by_request: dict[int, int] = {}  # id(og.Request) -> seq_id
        self._ended: list[tuple[int, FinishReason]] = []

    def prepare(self, prompt_ids: Sequence[int], params: SamplingParams) -> SamplingParams:
        check_params(params)
        check_processing(params)
        if not prompt_ids:
            raise DataError("a prompt must have at least one token", field="prompt")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(params, name):
                raise DataError(
                    f"{name} is not available on an onnxruntime-genai model: its engine has "
                    "only a multiplicative repetition penalty, not OpenAI's",
                    field=name,
                )
        if params.logprobs is not None:
            raise DataError(
                "logprobs are not available on an onnxruntime-genai model: its engine "
                "reports no token probabilities",
                field="logprobs",
            )
        if params.seed is not None and not params.greedy:
            raise DataError(
                "this onnxruntime-genai model cannot honour a seed in a batch", field="seed"
            )
        return within_context(params, len(prompt_ids), self.context)

    def text_decoder(self, prompt_ids: Sequence[int], params: SamplingParams) -> TextDecoder:
        return TextDecoder(self.tokenizer, params, self.generator._eos(params), len(prompt_ids))

    def _owned(self) -> Any:
        """The engine and its event buffer, created on the calling (owner) thread once."""
        if self._og is None:
            import onnxruntime_genai as og

            engine = og.Engine(self.generator.model)
            self._og = (engine, engine.create_event_buffer(256))
        return self._og

    def add(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        import onnxruntime_genai as og

        if seq_id in self._requests:
            raise DataError(f"sequence {seq_id} is already decoding", field="seq_id")
        request = self._owned()[0].create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(params.max_new_tokens)
        options.set_do_sample(not params.greedy)
        if not params.greedy:
            options.set_temperature(params.temperature)
            options.set_top_p(params.top_p)
            options.set_top_k(0)  # 0 disables top-k: pure nucleus sampling
        if params.json_schema is not None:
            options.set_guidance("json_schema", params.json_schema)  # llguidance inside
        turn = request.begin_turn(np.asarray(prompt_ids, dtype=np.int32), options)
        self._requests[seq_id] = _Request(request, turn, len(prompt_ids))
        self._by_request[id(request)] = seq_id

    def step(self) -> list[tuple[int, int]]:
        import onnxruntime_genai as og

        if self._og is None or not self._og[0].has_pending_requests():
            return []
        engine, buffer = self._og
        engine.run(buffer)
        out: list[tuple[int, int]] = []
        for k in range(len(buffer)):
            event = buffer[k]
            seq_id = self._by_request.get(id(event.request))
            if seq_id is None or seq_id not in self._requests:
                continue  # a removed sequence's last events
            if event.flags & og.EngineEventFlags.FAILED:
                raise BundleError(f"onnxruntime-genai failed a request (code {event.error_code})")
            if event.flags & og.EngineEventFlags.TOKEN:
                self._requests[seq_id].tokens += 1
                out.append((seq_id, int(event.token)))
            elif event.flags & og.EngineEventFlags.TURN_FINISHED:
                self._finished(seq_id, event, out)
        return out

    def _finished(self, seq_id: int, event: og.EngineEvent, out: list[tuple[int, int]]) -> None:
        """A turn the engine ended without a token: its eos becomes the eos token (so the
        TextDecoder ends with "stop"), anything else an :meth:`ended` entry."""
        import onnxruntime_genai as og

        eos = self.generator._folder_eos
        if event.finish_reason == og.FinishReason.EOS and eos:
            out.append((seq_id, eos[0]))
        elif event.finish_reason == og.FinishReason.EOS:
            self._ended.append((seq_id, "stop"))
        else:
            self._ended.append((seq_id, "length"))

    def ended(self) -> list[tuple[int, FinishReason]]:
        done, self._ended = self._ended, []
        return done

    def logprobs(self) -> dict[int, TokenLogprob]:
        return {}  # refused at prepare: the engine reports no probabilities

    def remove(self, seq_id: int) -> None:
        held = self._requests.pop(seq_id, None)
        if held is None:
            return
        # cancel_turn raises when the turn had already finished: nothing to cancel then
        with contextlib.suppress(Exception):
            held.request.cancel_turn(held.turn)
        held.request.close()
        self._by_request.pop(id(held.request), None)

    def active(self) -> int:
        return len(self._requests)

    def kv_tokens(self) -> int:
        return sum(r.tokens for r in self._requests.values())


def batch_decoder_for(generator: object, *, prefill_chunk: int = 256) -> BatchDecoder:
    """The batched decoder for a generator: TorchGenerator -> :class:`TorchBatchDecoder`
    on its model, GenaiGenerator -> :class:`GenaiBatchDecoder`; BundleError otherwise."""
    from kiln.runtime.genai import GenaiGenerator
    from kiln.runtime.generation import TorchGenerator

    if isinstance(generator, TorchGenerator):
        return TorchBatchDecoder(generator.model, generator.tokenizer, prefill_chunk=prefill_chunk)
    if isinstance(generator, GenaiGenerator):
        return GenaiBatchDecoder(generator)
    raise BundleError(f"no batched decoder for a {type(generator).__name__}")
