"""Generation on onnxruntime-genai: building its model folder and running it.

:func:`build_genai` turns a transformers model directory into an onnxruntime-genai
folder (``genai_config.json``, ``model.onnx`` + data, tokenizer files) with the
package's model builder, for the CPU execution provider. :class:`GenaiGenerator` runs
such a folder behind the :class:`~kiln.runtime.generation.Generator` interface: prompts
go in as ids from kiln's own tokenizer and tokens are decoded by it, through the same
:class:`~kiln.runtime.generation.TextDecoder` as the torch generator (same stop and
streaming rules).

Batches (:meth:`GenaiGenerator.generate`) run on onnxruntime-genai's continuous-batching
``Engine`` (one request per prompt), except seeded sampling: a per-request seed needs an
engine built for paged attention, which the CPU builder does not make, so seeded
batches run one prompt after another on ``og.Generator``. Batched ``GeneratorParams``
(``batch_size`` with left padding) is not used: on 0.18 CPU its padded rows diverge
from their unpadded greedy output.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from kiln.errors import BundleError, DataError, ExportError
from kiln.runtime.generation import (
    Completion,
    SamplingParams,
    TextDecoder,
    TokenStream,
    check_params,
    check_plain,
    eos_ids_of,
)

if TYPE_CHECKING:
    import onnxruntime_genai as og

GenaiPrecision = Literal["int4", "int8", "fp32"]

# MatMulNBits weight-only quantization: 32 weights share a scale; accuracy level 4
# computes with int8 activations (the fast CPU kernel).
_QUANT_OPTIONS = ["block_size=32", "accuracy_level=4"]


def build_genai(hf_dir: Path, out_dir: Path, *, precision: GenaiPrecision) -> None:
    """Write an onnxruntime-genai model folder for ``hf_dir`` (config.json,
    model.safetensors and tokenizer files) into ``out_dir``, for the CPU: ``fp32``, or
    ``int4``/``int8`` MatMulNBits weight-only quantization (block 32, accuracy level 4).
    The builder's download cache is a temporary directory, removed afterwards; its
    console output is captured and shown only in the ExportError of a failed build."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{hf_dir} has no config.json", field="hf_dir")
    options = ["hf_token=false", *(_QUANT_OPTIONS if precision != "fp32" else [])]
    log = io.StringIO()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="kiln-genai-cache-") as cache,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
            _quiet_quantizer(),
        ):
            extra = parse_extra_options(
                None, str(hf_dir), str(out_dir), precision, "cpu", cache, options
            )
            create_model(None, str(hf_dir), str(out_dir), precision, "cpu", cache, **extra)
    except Exception as exc:  # the builder raises bare Exception/ValueError/KeyError
        tail = log.getvalue()[-2000:]
        raise ExportError(
            f"onnxruntime-genai could not build {precision} from {hf_dir}: {exc}\n{tail}",
            field="precision",
        ) from exc
    if not (out_dir / "genai_config.json").is_file():
        raise ExportError(f"onnxruntime-genai wrote no genai_config.json in {out_dir}")


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizer logs through its own handlers (not stderr, which is
    captured above), e.g. an ERROR line for every embedding it leaves in 8 bits while
    the build goes on; keep those out of the user's terminal."""
    import logging

    quantizer = logging.getLogger("onnxruntime.quantization")
    level = quantizer.level
    quantizer.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        quantizer.setLevel(level)


class GenaiGenerator:
    """A :class:`~kiln.runtime.generation.Generator` on an onnxruntime-genai folder.

    Streams run on ``og.Generator`` (one token per step; closing the stream stops it);
    batches on ``og.Engine`` (see the module docstring). Generation is bounded by the
    folder's ``context_length``: a prompt that fills it ends with ``"length"``. The
    folder's ``eos_token_id`` always ends a sequence (onnxruntime-genai stops there),
    besides ``SamplingParams.eos_ids``."""

    name = "onnxruntime-genai"

    def __init__(self, folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
        import onnxruntime_genai as og

        self.folder = Path(folder)
        config_path = self.folder / "genai_config.json"
        try:
            config = json.loads(config_path.read_text())
            model_config = config["model"]
            self.context_length = int(model_config["context_length"])
            self.vocab_size = int(model_config["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{config_path} is not a genai config: {exc}") from exc
        check_genai_folder(self.folder, config)
        eos = model_config.get("eos_token_id")
        self._folder_eos = [
            int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None
        ]
        self.tokenizer = tokenizer
        try:
            self.model = og.Model(str(self.folder))
        except Exception as exc:  # og raises RuntimeError with the loader's message
            raise BundleError(f"onnxruntime-genai cannot load {self.folder}: {exc}") from exc
        self._engine: og.Engine | None = None
        self._engine_lock = threading.Lock()

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> TokenStream:
        """Stream one completion (see :class:`~kiln.runtime.generation.TokenStream`)."""
        check_params(params)
        check_plain(params)
        prompt = self._checked(prompt_ids)
        decoder = TextDecoder(self.tokenizer, params, self._eos(params), len(prompt))
        return TokenStream(self._steps(prompt, params, decoder), decoder)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        """Complete every prompt: on the Engine for several prompts, except seeded
        sampling (run one by one, so a seed gives the same text every time)."""
        check_params(params)
        check_plain(params)
        rows = [self._checked(p) for p in prompts]
        if len(rows) > 1 and (params.greedy or params.seed is None):
            return self._engine_batch(rows, params)
        return [self._one(r, params) for r in rows]

    def _one(self, prompt: list[int], params: SamplingParams) -> Completion:
        stream = self.stream(prompt, params)
        for _ in stream:
            pass
        return stream.completion

    def _checked(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise DataError("a prompt must have at least one token", field="prompt")
        if len(prompt) >= self.context_length:
            raise DataError(
                f"the prompt has {len(prompt)} tokens; "
                f"the model's context is {self.context_length}",
                field="prompt",
            )
        return prompt

    def _eos(self, params: SamplingParams) -> frozenset[int]:
        # onnxruntime-genai always ends a sequence at the folder's eos ids, so they end
        # it here too, besides params.eos_ids (or the tokenizer's eos).
        return eos_ids_of(self.tokenizer, params) | set(self._folder_eos)

    def _budget(self, prompt: list[int], params: SamplingParams) -> int:
        """New tokens allowed: max_new_tokens, within the context length."""
        return min(params.max_new_tokens, self.context_length - len(prompt))

    def _steps(
        self, prompt: list[int], params: SamplingParams, decoder: TextDecoder
    ) -> Iterator[str]:
        import time

        import onnxruntime_genai as og

        search: dict[str, bool | int | float] = {
            "max_length": len(prompt) + self._budget(prompt, params),
            "do_sample": not params.greedy,
        }
        if not params.greedy:
            # top_k = vocab disables og's default top-k 50: pure nucleus sampling.
            search.update(temperature=params.temperature, top_p=params.top_p)
            search["top_k"] = self.vocab_size
            if params.seed is not None:
                search["random_seed"] = params.seed
        gen_params = og.GeneratorParams(self.model)
        gen_params.set_search_options(**search)
        generator = og.Generator(self.model, gen_params)
        start = time.perf_counter()
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if decoder.first_token_s is None:
                decoder.first_token_s = time.perf_counter() - start
            delta = decoder.push(token)
            if delta:
                yield delta
            if decoder.done:
                return
        # og stopped by itself: its max_length, or its own end-of-sequence id.
        length = len(decoder.token_ids) >= self._budget(prompt, params)
        delta = decoder.end("length" if length else "stop")
        if delta:
            yield delta

    def _engine_batch(self, rows: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Run ``rows`` as concurrent Engine requests; our decoders stop each one."""
        import time

        import onnxruntime_genai as og

        eos = self._eos(params)
        decoders = [TextDecoder(self.tokenizer, params, eos, len(r)) for r in rows]
        with self._engine_lock:
            if self._engine is None:
                self._engine = og.Engine(self.model)
            engine = self._engine
            requests: list[og.Request] = []
            turns: list[int] = []
            start = time.perf_counter()
            for row in rows:
                request = engine.create_request()
                options = og.TurnOptions(request)
                options.set_max_generated_tokens(self._budget(row, params))
                options.set_do_sample(not params.greedy)
                if not params.greedy:
                    options.set_temperature(params.temperature)
                    options.set_top_p(params.top_p)
                    options.set_top_k(0)  # 0 disables top-k: pure nucleus sampling
                turns.append(request.begin_turn(np.asarray(row, dtype=np.int32), options))
                requests.append(request)
            index = {id(r): i for i, r in enumerate(requests)}
            buffer = engine.create_event_buffer(max(64, 2 * len(rows)))
            try:
                while engine.has_pending_requests():
                    engine.run(buffer)
                    for k in range(len(buffer)):
                        self._on_event(buffer[k], index, decoders, requests, turns, start)
            finally:
                for request in requests:
                    request.close()
        for row, dec in zip(rows, decoders, strict=True):
            if not dec.done:  # the engine ended the turn: its length cap or its eos
                length = len(dec.token_ids) >= self._budget(row, params)
                dec.end("length" if length else "stop")
        return [d.completion() for d in decoders]

    def _on_event(
        self,
        event: og.EngineEvent,
        index: dict[int, int],
        decoders: list[TextDecoder],
        requests: list[og.Request],
        turns: list[int],
        start: float,
    ) -> None:
        import time

        import onnxruntime_genai as og

        if event.flags & og.EngineEventFlags.FAILED:
            raise BundleError(f"onnxruntime-genai failed a request (code {event.error_code})")
        i = index[id(event.request)]
        dec = decoders[i]
        if dec.done:
            return
        if not event.flags & og.EngineEventFlags.TOKEN:
            # The engine reports its eos as a finish reason, without the token.
            finished = event.flags & og.EngineEventFlags.TURN_FINISHED
            if finished and event.finish_reason == og.FinishReason.EOS and self._folder_eos:
                dec.push(self._folder_eos[0])
            return
        if dec.first_token_s is None:
            dec.first_token_s = time.perf_counter() - start
        dec.push(int(event.token))
        if dec.finish is not None:  # our stop rules ended it: free the engine's slot
            requests[i].cancel_turn(turns[i])


# What a genai model folder may hold: ONNX graphs, their external data, JSON configs and
# tokenizer files. Anything else (a shared library above all) is refused before
# onnxruntime-genai sees the folder.
_GENAI_SUFFIXES = (".onnx", ".onnx.data", ".data", ".json", ".jinja", ".txt", ".model")
# Config keys that make onnxruntime-genai load native code or reach outside the folder.
_FORBIDDEN_KEYS = ("custom_ops_library", "custom_op", "library", "plugin")


def check_genai_folder(folder: Path, config: object) -> None:
    """Refuse a genai model folder that could run code when loaded: a file that is not
    a graph, its data, JSON or a tokenizer file; a config key that loads a library
    (``custom_ops_library``); a ``filename`` that is not a plain name inside the folder."""
    for path in folder.rglob("*"):
        if path.is_symlink():
            raise BundleError(f"{folder} may hold no links: {path.name}")
        if path.is_dir():
            raise BundleError(f"{folder} may hold no sub-folders: {path.name}")
        if not path.name.endswith(_GENAI_SUFFIXES):
            raise BundleError(f"{folder} holds a file a genai model has no use for: {path.name}")
    for key, value in _walk(config):
        if key == "session_options":
            _check_session_options(folder, value)
        lowered = key.lower()
        if any(bad in lowered for bad in _FORBIDDEN_KEYS):
            raise BundleError(f"{folder / 'genai_config.json'}: {key!r} is not allowed")
        if lowered.endswith("filename") and (
            not isinstance(value, str) or Path(value).name != value or value in ("", ".", "..")
        ):
            raise BundleError(
                f"{folder / 'genai_config.json'}: {key} must name a file in the folder"
            )


# Session options a CPU model folder may set: none of them reads or writes a file
# (enable_profiling, for one, writes a profile wherever it says) or loads code.
_SESSION_OPTIONS = frozenset(
    {
        "log_id",
        "log_severity_level",
        "intra_op_num_threads",
        "inter_op_num_threads",
        "enable_cpu_mem_arena",
        "enable_mem_pattern",
        "graph_optimization_level",
    }
)


def _check_session_options(folder: Path, options: object) -> None:
    """Only the :data:`_SESSION_OPTIONS` keys, with plain values; no provider options
    (kiln builds CPU models, and an execution provider's options may name files)."""
    where = folder / "genai_config.json"
    if not isinstance(options, dict):
        raise BundleError(f"{where}: session_options must be an object")
    if options.get("provider_options", []) != []:
        raise BundleError(f"{where}: session option(s) ['provider_options'] are not allowed")
    extra = sorted(set(options) - _SESSION_OPTIONS - {"provider_options"})
    if extra:
        raise BundleError(f"{where}: session option(s) {extra} are not allowed")
    if any(isinstance(v, dict | list) for k, v in options.items() if k != "provider_options"):
        raise BundleError(f"{where}: session options take plain values")


def _walk(node: object, key: str = "") -> Iterator[tuple[str, object]]:
    """Every (key, value) pair of a JSON document, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k), v
            yield from _walk(v, str(k))
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)
