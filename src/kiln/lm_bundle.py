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

import json
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from kiln.bundle import (
    META_FILE,
    REPORT_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    check_destination,
    default_permissions,
    read_json,
    replace_dir,
    sha256_file,
    write_json,
)
from kiln.data.dialogs import Message
from kiln.errors import BundleError, NotFoundError
from kiln.manifest import BundleMeta, parse_manifest
from kiln.models.registry import build

if TYPE_CHECKING:
    from kiln.evaluate.lm_eval import LMEvaluation
    from kiln.evaluate.metrics import Metrics
    from kiln.runtime.generation import Completion, Generator, TokenStream

GENERATION_FILE = "generation.json"
GENAI_DIR = "genai"
ADAPTER_DIR = "adapter"

Prompt = str | Sequence[Message] | Sequence[dict[str, str]]
"""A plain prompt, or chat messages (``{"role": ..., "content": ...}``)."""


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

    def params(self, **overrides: Any) -> Any:
        """SamplingParams from the bundle's defaults, with non-None ``overrides``."""
        from kiln.runtime.generation import SamplingParams

        d = self.generation
        given = {k: v for k, v in overrides.items() if v is not None}
        stop = tuple(given.pop("stop", d.stop))
        return SamplingParams(
            max_new_tokens=given.pop("max_new_tokens", d.max_new_tokens),
            temperature=given.pop("temperature", d.temperature),
            top_p=given.pop("top_p", d.top_p),
            seed=given.pop("seed", None),
            stop=stop,
            eos_ids=tuple(d.eos_ids),
        )

    def generate(
        self,
        prompt: Prompt,
        *,
        system: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> Completion:
        """Generate one completion for ``prompt`` (settings default to generation.json)."""
        params = self.params(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
        )
        return self.generator.generate([self.prompt_ids(prompt, system=system)], params)[0]

    def generate_batch(self, prompts: Sequence[Prompt], **settings: Any) -> list[Completion]:
        """One completion per prompt, decoded together in one batch."""
        params = self.params(**settings)
        return self.generator.generate([self.prompt_ids(p) for p in prompts], params)

    def stream(
        self,
        prompt: Prompt,
        *,
        system: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> TokenStream:
        """Text deltas as they are generated; the stream's ``completion`` once exhausted."""
        params = self.params(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
        )
        return self.generator.stream(self.prompt_ids(prompt, system=system), params)

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
            adapter = _adapter_of(self.model) if self.model is not None else None
            if adapter is not None:
                adapter.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True)
            elif self.model is not None:
                _save_weights(self.model, tmp / WEIGHTS_FILE)
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            write_json(tmp / GENERATION_FILE, self.generation.model_dump(mode="json"))
            if self.genai is not None:
                shutil.copytree(self.genai, tmp / GENAI_DIR)
            if self.report is not None:
                write_json(tmp / REPORT_FILE, self.report)

        _write_bundle(out, self.meta, write)
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
            _with_adapter(path, meta)
            if has_adapter
            else _build(path, meta)
            if WEIGHTS_FILE in meta.files
            else None
        )
        tokenizer = _tokenizer(path, meta)
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
            _save_weights(self.model, tmp / WEIGHTS_FILE)
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))

        _write_bundle(out, self.meta, write)
        self.path = out
        return out

    @classmethod
    def load(cls, directory: str | Path) -> EmbeddingBundle:
        path = Path(directory)
        meta = read_verified_manifest(path)
        if meta.task != "embedding":
            raise BundleError(f"bundle {path} is a {meta.task} bundle, not an embedding one")
        bundle = cls(meta, _build(path, meta), _tokenizer(path, meta))
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


def read_verified_manifest(path: Path) -> BundleMeta:
    """The manifest of the bundle at ``path``, after every listed file matched its hash."""
    if not path.is_dir():
        raise NotFoundError(f"bundle directory not found: {path}", field="bundle")
    meta = parse_manifest(read_json(path / META_FILE), str(path / META_FILE))
    links = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_symlink()]
    if links:  # a link would make a listed, hashed name read a file outside the bundle
        raise BundleError(f"bundle {path} holds links: {links[:5]}")
    for name, expected in meta.files.items():
        file = path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise BundleError(f"{path / META_FILE} lists a path outside the bundle: {name}")
        if not file.is_file():
            raise BundleError(f"bundle {path} is missing {name}")
        if sha256_file(file) != expected:
            raise BundleError(f"{file} does not match its checksum in {META_FILE}")
    unlisted = [
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.relative_to(path).as_posix() not in {META_FILE, *meta.files}
    ]
    if unlisted:
        raise BundleError(f"bundle {path} holds files {META_FILE} does not list: {unlisted[:5]}")
    # an onnxruntime-genai variant may run its genai/ model alone, without torch weights;
    # an adapter bundle holds its LoRA adapter instead
    adapter = f"{ADAPTER_DIR}/adapter_config.json" in meta.files
    if (
        WEIGHTS_FILE not in meta.files
        and meta.runtime.backend != "onnxruntime-genai"
        and not adapter
    ):
        raise BundleError(f"bundle {path} is missing {WEIGHTS_FILE}")
    return meta


def _build(path: Path, meta: BundleMeta) -> nn.Module:
    """The architecture from its recorded config, with the bundle's weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if "hf_config" not in meta.model_context:
        # without its config the builder would load from model.path: outside the bundle
        raise BundleError(f"bundle {path}: the model's config is missing from {META_FILE}")
    try:
        model = build(meta.model, meta.n_inputs, meta.n_outputs, **meta.model_context)
    except Exception as exc:  # a manifest that describes no buildable model
        raise BundleError(f"{path / META_FILE} describes no valid model: {exc}") from None
    try:
        load_model(model, str(path / WEIGHTS_FILE), strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise BundleError(f"{path / WEIGHTS_FILE} does not fit the model: {exc}") from None
    return model


def _adapter_of(model: nn.Module) -> Any:
    """The peft model inside a CausalLM whose LoRA adapters were kept (merge: false)."""
    hf = getattr(model, "hf", None)
    return hf if hf is not None and type(hf).__module__.startswith("peft") else None


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def _with_adapter(path: Path, meta: BundleMeta) -> nn.Module:
    """An adapter bundle: the base weights it references (a local path or ``pkg:``, never
    a hub id; checked against their SHA-256), with the bundle's LoRA adapter on top
    (peft reads its JSON config and safetensors weights, nothing else)."""
    from peft import PeftModel

    from kiln.errors import SpecError
    from kiln.models.causal_lm import CausalLM
    from kiln.models.lm_source import load_pretrained_lm, resolve_lm_source, weights_digest
    from kiln.models.pretrained import resolve_model_path

    others = [p.name for p in (path / ADAPTER_DIR).iterdir() if p.name not in ADAPTER_FILES]
    if others:
        raise BundleError(f"bundle {path}: {ADAPTER_DIR}/ may not hold {others}")
    base = meta.model_context.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("path"), str):
        raise BundleError(f"bundle {path}: an adapter bundle must name its base weights")
    where = resolve_model_path(str(base["path"]))
    if not Path(where).expanduser().exists():  # never a hub download at load time
        raise BundleError(f"bundle {path}: its base weights {base['path']} are not on this machine")
    try:
        source = resolve_lm_source(where)
        digest = weights_digest(source)
    except SpecError as exc:
        raise BundleError(f"bundle {path}: its base weights: {exc.message}") from None
    if digest != base.get("sha256"):
        raise BundleError(
            f"bundle {path}: the base weights at {source.display} are not the ones the "
            "adapter was trained on (their SHA-256 differs)"
        )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing (peft's to fix)
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        peft = PeftModel.from_pretrained(load_pretrained_lm(source), str(path / ADAPTER_DIR))
    return CausalLM(peft).eval()


def _tokenizer(path: Path, meta: BundleMeta) -> Any:
    from kiln.data.text import load_tokenizer

    if not any(f.startswith(f"{TOKENIZER_DIR}/") for f in meta.files):
        raise BundleError(f"bundle {path} has no tokenizer")
    return load_tokenizer(path / TOKENIZER_DIR, for_bundle=True)


def _save_weights(model: nn.Module, file: Path) -> None:
    """safetensors of the fp32 tensors; tied tensors (embeddings = LM head) once."""
    from safetensors.torch import save_model

    save_model(model, str(file), metadata={"format": "kiln.bundle"})


def _write_bundle(out: Path, meta: BundleMeta, write: Any) -> None:
    """Write files with ``write(tmp)``, hash them into ``meta``, then swap into ``out``."""
    check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        meta.files = {
            p.relative_to(tmp).as_posix(): sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        write_json(tmp / META_FILE, meta.model_dump(mode="json"))
        default_permissions(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def manifest_task(directory: str | Path) -> str | None:
    """The task a bundle's ``kiln.json`` records (None when unreadable)."""
    try:
        doc = json.loads((Path(directory) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    task = doc.get("task") if isinstance(doc, dict) else None
    return task if isinstance(task, str) else None
