"""Where a causal LM's weights come from: a Hugging Face directory, a GGUF file, a package.

``resolve_lm_source`` turns a spec's ``model.path`` into an :class:`LMSource` (a local
directory, plus the name of a ``.gguf`` file in it for GGUF weights) and checks that it
exists; the loaders read it with ``trust_remote_code=False`` and ``local_files_only=True``,
so only architectures that ship inside ``transformers`` load and nothing reaches the
network. GGUF weights are dequantised to float by transformers' GGUF loader. A hub id is
accepted only with ``KILN_ALLOW_HUB=1``; it is then downloaded once into the Hugging Face
cache and used from there like any directory. Every error is a SpecError on
``model.path`` that names the file.

Heavy imports (transformers, gguf) happen inside the functions: the CLI imports this
module.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import SpecError
from kiln.models.pretrained import local_model_dir, resolve_model_path

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

FIELD = "model.path"
GGUF_SUFFIX = ".gguf"
# The files a hub download keeps: config, safetensors weights, tokenizer, templates.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.gguf"]
_UNSUPPORTED_GGUF = re.compile(r"GGUF model with architecture (\S+) is not supported")


@dataclass(frozen=True)
class LMSource:
    """A local model: ``directory`` (a Hugging Face model directory, or the folder of a
    GGUF file) and ``gguf_file`` (that file's name inside it; None for a HF directory)."""

    directory: Path
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        """The path errors name: the GGUF file, else the directory."""
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def resolve_lm_source(path: str) -> LMSource:
    """``model.path`` -> an existing local source.

    Accepts a Hugging Face model directory (with config.json), a ``.gguf`` file,
    ``pkg:<package>/<file or dir>`` (inside an installed package, found without importing
    it), or a hub id where ``KILN_ALLOW_HUB=1``. ``base:<name>`` (a server catalog entry)
    and, without the setting, hub ids are SpecErrors.
    """
    resolved = resolve_model_path(path)
    if resolved.lower().endswith(GGUF_SUFFIX):
        file = Path(resolved).expanduser()
        if not file.is_file():
            raise SpecError(f"GGUF file not found: {path}", field=FIELD)
        return LMSource(directory=file.parent, gguf_file=file.name)
    directory = local_model_dir(resolved)
    if directory is None:  # a hub id, and KILN_ALLOW_HUB allows the download
        return LMSource(directory=_download(resolved))
    return LMSource(directory=directory)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # hub errors have many types (HTTP, offline, not found)
        raise SpecError(f"cannot download {repo_id}: {exc}", field=FIELD) from None


def is_causal_lm_config(model_type: str, architectures: list[str] | None) -> bool:
    """Whether a config describes a decoder-only LM (not an encoder such as BERT, which
    transformers can also give a causal head, nor an encoder-decoder)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if architectures and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return True
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def _dir_config(source: LMSource) -> tuple[str, list[str] | None]:
    """(model_type, architectures) of a HF directory's config.json."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            str(source.directory), trust_remote_code=False, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise SpecError(
            f"cannot read {source.directory / 'config.json'}: {_first_line(exc)}", field=FIELD
        ) from None
    model_type: str = config.model_type
    architectures: list[str] | None = getattr(config, "architectures", None)
    return model_type, architectures


def load_pretrained_lm(source: LMSource, *, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The pretrained causal LM of ``source`` (float32 unless ``dtype`` says otherwise;
    GGUF weights dequantised). A directory of an encoder-only model is a SpecError."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # kiln shows its own progress
    if source.gguf_file is None:
        model_type, architectures = _dir_config(source)
        if not is_causal_lm_config(model_type, architectures):
            raise SpecError(
                f"{source.display} holds a {model_type} model "
                f"({', '.join(architectures or []) or 'no architectures listed'}): not a "
                "causal language model; kiln import makes it an embedding bundle",
                field=FIELD,
            )
    try:
        with _quiet_gguf_progress():
            model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
                str(source.directory),
                gguf_file=source.gguf_file,
                dtype=dtype or torch.float32,
                trust_remote_code=False,
                local_files_only=True,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise _load_error(source, "model", exc) from None
    return model


@contextlib.contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """Silence transformers' GGUF dequantisation bar for the duration: it is a plain
    tqdm that ``disable_progress_bar`` does not reach, and it would draw over kiln's own
    progress display."""
    import functools

    from transformers import modeling_gguf_pytorch_utils

    gguf_utils: Any = modeling_gguf_pytorch_utils
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_lm_tokenizer(source: LMSource) -> PreTrainedTokenizerFast:
    """The tokenizer of ``source`` (a GGUF file's comes from its ``tokenizer.ggml.*``
    metadata).

    Padding uses the tokenizer's pad token; a tokenizer without one pads with its EOS
    token (padding never reaches the loss or the attention, so this only fills rows).
    Neither is a SpecError naming the file.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tok = AutoTokenizer.from_pretrained(
            str(source.directory),
            gguf_file=source.gguf_file,
            trust_remote_code=False,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _load_error(source, "tokenizer", exc) from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise SpecError(
            f"{source.display}: a slow tokenizer ({type(tok).__name__}); kiln needs a fast "
            "one (tokenizer.json)",
            field=FIELD,
        )
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise SpecError(
                f"{source.display}: the tokenizer has neither a pad nor an EOS token",
                field=FIELD,
            )
        tok.pad_token = tok.eos_token
    return tok


def is_sentence_encoder(source: LMSource) -> bool:
    """Whether ``source`` is an encoder-only HF directory (e.g. a sentence-transformers
    model such as all-MiniLM-L6-v2) rather than a causal LM."""
    if source.gguf_file is not None or not (source.directory / "config.json").is_file():
        return False
    model_type, architectures = _dir_config(source)
    return not is_causal_lm_config(model_type, architectures)


def load_sentence_encoder(
    source: LMSource,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(the encoder as ``AutoModel``, its tokenizer) for ``kiln import`` of an
    embedding model; a causal LM is a SpecError."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not is_sentence_encoder(source):
        raise SpecError(f"{source.display} is not a sentence encoder directory", field=FIELD)
    hf_logging.disable_progress_bar()
    try:
        model: PreTrainedModel = AutoModel.from_pretrained(
            str(source.directory), trust_remote_code=False, local_files_only=True
        )
        tok: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            str(source.directory), trust_remote_code=False, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise _load_error(source, "encoder", exc) from None
    return model, tok


def _load_error(source: LMSource, what: str, exc: Exception) -> SpecError:
    """A SpecError naming the file; an unsupported GGUF architecture lists the supported."""
    match = _UNSUPPORTED_GGUF.search(str(exc))
    if match:
        return SpecError(
            f"{source.display}: GGUF architecture {match.group(1)!r} is not supported by "
            f"transformers' GGUF loader (supported: {', '.join(_gguf_architectures())})",
            field=FIELD,
        )
    return SpecError(
        f"cannot load the {what} from {source.display}: {_first_line(exc)}", field=FIELD
    )


def _gguf_architectures() -> list[str]:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # the list moved: the message still names the architecture
        return ["see the transformers GGUF documentation"]
    return sorted(str(a) for a in GGUF_SUPPORTED_ARCHITECTURES)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def weights_digest(source: LMSource) -> str:
    """SHA-256 of the source's weights: its GGUF file, or a directory's config.json and
    safetensors files in name order (what lineage records and an adapter bundle checks
    its base against). A directory without safetensors weights is a SpecError."""
    import hashlib

    if source.gguf_file:
        files = [source.directory / source.gguf_file]
    else:
        files = sorted(source.directory.glob("*.safetensors"))
        if not files:
            raise SpecError(f"{source.display} holds no safetensors weights", field=FIELD)
        files = [source.directory / "config.json", *files]
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
