"""Generation and embedding bundles: language models in the bundle format.

::

    kiln.json            task generation | embedding, the model spec, its HF config
                         (model_context.hf_config), lineage, SHA-256 of every file
    weights.safetensors  the model's tensors (LoRA merged; tied tensors stored once)
    adapter/             instead, with ``lora: {merge: false}``: the LoRA adapter (peft's
                         adapter_config.json + adapter_model.safetensors); the base
                         weights are referenced by path and SHA-256 (model_context.base)
    tokenizer/           the tokenizer's JSON files, with the chat template
    generation.json      generation bundles: the defaults (max_new_tokens, temperature,
                         top_p, stop, eos_ids) and the prompt format
    genai/               optional: an onnxruntime-genai model (int4/int8 variants),
                         run when ``runtime.backend`` is ``onnxruntime-genai``
                         (such a variant may ship no weights.safetensors: ``model`` None)
    compression.json     optional: measurements of a compressed variant

As for every bundle, saving is atomic and loading reads JSON and safetensors only:
the architecture is rebuilt from its config (``AutoModelForCausalLM.from_config``),
nothing is unpickled and no remote code runs. Nothing is read from outside the folder,
except by an adapter bundle: its base weights, from the local path (or ``pkg:``) it
records, checked against their SHA-256. A genai/ folder is checked to hold only graphs,
their data, JSON and tokenizer files, with no config key that loads a library.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from typing_extensions import Unpack

from kiln.bundle import REPORT_FILE, TOKENIZER_DIR, WEIGHTS_FILE, read_json, write_json
from kiln.data.dialogs import Message
from kiln.errors import BundleError
from kiln.lm_bundle_files import (
    ADAPTER_DIR,
    adapter_of,
    build_model,
    bundle_tokenizer,
    read_verified_manifest,
    save_weights,
    with_adapter,
    write_bundle,
)
from kiln.manifest import BundleMeta

if TYPE_CHECKING:
    from kiln.evaluate.lm_eval import LMEvaluation
    from kiln.evaluate.metrics import Metrics
    from kiln.runtime.generation import Completion, Generator, SamplingParams, TokenStream

GENERATION_FILE = "generation.json"
GENAI_DIR = "genai"

Prompt = str | Sequence[Message] | Sequence[dict[str, str]]
"""A plain prompt, or chat messages (``{"role": ..., "content": ...}``)."""


class Sampling(TypedDict, total=False):
    """Generation settings a call may give; None (or left out) takes generation.json's."""

    max_new_tokens: int | None
    temperature: float | None  # 0: greedy
    top_p: float | None
    seed: int | None  # same seed, same sample
    stop: Sequence[str] | None


class GenerationDefaults(BaseModel):
    """``generation.json``: what ``generate`` uses when a call leaves a setting out."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, description="0: greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = []
    eos_ids: list[int] = []
    # chat: prompts go through the chat template; completion/text: as raw text
    prompt_format: Literal["chat", "completion", "text"] = "chat"
    # the tokenizer had no chat template and kiln's plain default was set
    default_chat_template: bool = False
    # chat bundles: the system message every training chat began with; a prompt that
    # brings no system message of its own gets it
    system: str | None = None


class LMBundle:
    """A causal language model with its tokenizer and generation defaults."""

    def __init__(
        self,
        meta: BundleMeta,
        model: nn.Module | None,
        tokenizer: Any,
        generation: GenerationDefaults,
        *,
        genai: Path | None = None,
    ) -> None:
        self.meta = meta
        # None: an onnxruntime-genai variant that ships no torch weights (kiln compress)
        self.model = model.eval() if model is not None else None
        self.tokenizer = tokenizer
        self.generation = generation
        self.genai = genai  # an onnxruntime-genai model folder (a quantized variant)
        self.report: dict[str, Any] | None = None  # compression.json of a compressed variant
        self.path: Path | None = None
        self._generator: Generator | None = None

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def metrics(self) -> dict[str, Metrics]:
        """Per held-out split (``test``, ``val``): loss and perplexity at training."""
        return self.meta.metrics

    @property
    def max_length(self) -> int:
        return int(getattr(self.meta.model, "max_length", 512))

    @property
    def generator(self) -> Generator:
        """The engine the manifest's ``runtime`` names (``kiln.runtime.select``)."""
        if self._generator is None:
            from kiln.runtime.select import recorded_generator

            self._generator = recorded_generator(
                self.model, self.tokenizer, self.meta.runtime, self.genai
            )
        return self._generator

    # ---- generation --------------------------------------------------------------

    def prompt_ids(self, prompt: Prompt, *, system: str | None = None) -> list[int]:
        """The token ids a prompt becomes: chat messages (or a string, as one user turn)
        through the chat template for chat bundles, raw text otherwise. A chat without a
        system message gets ``system``, else the bundle's default one (generation.json)."""
        from kiln.data.lm_encode import prompt_ids

        chat = self.generation.prompt_format == "chat"
        if isinstance(prompt, str) and not chat:
            text = prompt if system is None else f"{system}\n\n{prompt}"
            return prompt_ids(self.tokenizer, text, chat=False)
        messages = _messages(prompt, system)
        default = self.generation.system
        if default is not None and chat and all(m.role != "system" for m in messages):
            messages = [Message(role="system", content=default), *messages]
        return prompt_ids(self.tokenizer, messages, chat=True)

    def params(self, **overrides: Unpack[Sampling]) -> SamplingParams:
        """SamplingParams from the bundle's defaults, with the non-None ``overrides``."""
        from kiln.runtime.generation import SamplingParams

        d = self.generation
        max_new, temperature, top_p, stop = (
            overrides.get("max_new_tokens"),
            overrides.get("temperature"),
            overrides.get("top_p"),
            overrides.get("stop"),
        )
        return SamplingParams(
            max_new_tokens=d.max_new_tokens if max_new is None else max_new,
            temperature=d.temperature if temperature is None else temperature,
            top_p=d.top_p if top_p is None else top_p,
            seed=overrides.get("seed"),
            stop=tuple(d.stop if stop is None else stop),
            eos_ids=tuple(d.eos_ids),
        )

    def generate(
        self, prompt: Prompt, *, system: str | None = None, **settings: Unpack[Sampling]
    ) -> Completion:
        """Generate one completion for ``prompt`` (settings default to generation.json)."""
        ids = self.prompt_ids(prompt, system=system)
        return self.generator.generate([ids], self.params(**settings))[0]

    def generate_batch(
        self, prompts: Sequence[Prompt], **settings: Unpack[Sampling]
    ) -> list[Completion]:
        """One completion per prompt, decoded together in one batch."""
        params = self.params(**settings)
        return self.generator.generate([self.prompt_ids(p) for p in prompts], params)

    def stream(
        self, prompt: Prompt, *, system: str | None = None, **settings: Unpack[Sampling]
    ) -> TokenStream:
        """Text deltas as they are generated; the stream's ``completion`` once exhausted."""
        ids = self.prompt_ids(prompt, system=system)
        return self.generator.stream(ids, self.params(**settings))

    def evaluate(
        self,
        source: str | Path,
        *,
        max_new_tokens: int | None = None,
        batch: int = 8,
    ) -> LMEvaluation:
        """Loss and perplexity on ``source``'s examples (chat, completion or text data),
        and for chat/completion data greedy answers scored against the references
        (exact, normalised and JSON matches, ROUGE-L). Without ``max_new_tokens``,
        answers stop at 1.5 x the longest reference (+ 8 tokens) or the bundle's
        default, whichever is less."""
        from kiln.data.dialogs import read_corpus
        from kiln.evaluate.lm_eval import evaluate_lm

        corpus = read_corpus(str(source))
        params = self.params(max_new_tokens=max_new_tokens, temperature=0.0)
        return evaluate_lm(
            self.model,
            self.tokenizer,
            self.generator,
            corpus.examples,
            corpus.format,
            max_length=self.max_length,
            params=params,
            prompt=self.prompt_ids,
            batch=batch,
            budget=max_new_tokens is None,
        )

    # ---- persistence -------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the bundle to ``directory`` atomically (see the module docstring)."""
        out = Path(directory)

        def write(tmp: Path) -> None:
            adapter = adapter_of(self.model) if self.model is not None else None
            if adapter is not None:
                adapter.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True)
            elif self.model is not None:
                save_weights(self.model, tmp / WEIGHTS_FILE)
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            write_json(tmp / GENERATION_FILE, self.generation.model_dump(mode="json"))
            if self.genai is not None:
                shutil.copytree(self.genai, tmp / GENAI_DIR)
            if self.report is not None:
                write_json(tmp / REPORT_FILE, self.report)

        write_bundle(out, self.meta, write)
        self.path = out
        if self.genai is not None:
            self.genai = out / GENAI_DIR
        return out

    @classmethod
    def load(cls, directory: str | Path) -> LMBundle:
        """Read a generation bundle; verifies every file's hash and the weights' shapes."""
        path = Path(directory)
        meta = read_verified_manifest(path)
        if meta.task != "generation":
            raise BundleError(f"bundle {path} is a {meta.task} bundle, not a generation one")
        has_adapter = f"{ADAPTER_DIR}/adapter_config.json" in meta.files
        model = (
            with_adapter(path, meta)
            if has_adapter
            else build_model(path, meta)
            if WEIGHTS_FILE in meta.files
            else None
        )
        tokenizer = bundle_tokenizer(path, meta)
        try:
            generation = GenerationDefaults.model_validate(read_json(path / GENERATION_FILE))
        except ValidationError as exc:
            raise BundleError(f"{path / GENERATION_FILE} is invalid: {exc}") from None
        genai = path / GENAI_DIR if any(f.startswith(f"{GENAI_DIR}/") for f in meta.files) else None
        if genai is not None:  # refused now, not at the first generate
            from kiln.runtime.genai import check_genai_folder

            check_genai_folder(genai, read_json(genai / "genai_config.json"))
        bundle = cls(meta, model, tokenizer, generation, genai=genai)
        if REPORT_FILE in meta.files:
            bundle.report = read_json(path / REPORT_FILE)
        bundle.path = path
        return bundle


class EmbeddingBundle:
    """A sentence encoder: texts -> mean-pooled, L2-normalised vectors."""

    def __init__(self, meta: BundleMeta, model: nn.Module, tokenizer: Any) -> None:
        self.meta = meta
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.path: Path | None = None

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def dimensions(self) -> int:
        return int(self.meta.n_outputs)

    def embed(self, texts: Sequence[str], *, batch: int = 32) -> np.ndarray:
        """(N, D) float32 unit vectors for ``texts`` (truncated to the model's max_length)."""
        from kiln.models.sentence_encoder import embed

        max_length = getattr(self.meta.model, "max_length", 256)
        return embed(self.model, self.tokenizer, list(texts), max_length=max_length, batch=batch)

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)

        def write(tmp: Path) -> None:
            save_weights(self.model, tmp / WEIGHTS_FILE)
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))

        write_bundle(out, self.meta, write)
        self.path = out
        return out

    @classmethod
    def load(cls, directory: str | Path) -> EmbeddingBundle:
        path = Path(directory)
        meta = read_verified_manifest(path)
        if meta.task != "embedding":
            raise BundleError(f"bundle {path} is a {meta.task} bundle, not an embedding one")
        bundle = cls(meta, build_model(path, meta), bundle_tokenizer(path, meta))
        bundle.path = path
        return bundle


def _messages(prompt: Prompt, system: str | None) -> list[Message]:
    """Chat messages for a prompt: a string is one user turn; ``system`` goes first,
    in place of any system message the prompt holds."""
    if isinstance(prompt, str):
        messages = [Message(role="user", content=prompt)]
    else:
        messages = [m if isinstance(m, Message) else Message.model_validate(m) for m in prompt]
    if system is not None:  # replaces the prompt's own system message, if any
        messages = [
            Message(role="system", content=system),
            *(m for m in messages if m.role != "system"),
        ]
    return messages
