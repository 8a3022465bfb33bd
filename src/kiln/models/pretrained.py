"""Pretrained Hugging Face encoders fine-tuned for sequence classification/regression.

Training loads ``AutoModelForSequenceClassification`` from a local directory with
``trust_remote_code=False`` and ``local_files_only=True``: only architectures that ship
inside ``transformers`` load, and nothing reaches the network. A hub id is refused
unless ``KILN_ALLOW_HUB=1`` (the local CLI and library only: on the server, a spec names
a base model of the catalog, which a worker copies into a local directory first).
A bundle stores the model's config as JSON and its weights as safetensors; loading
rebuilds the architecture from that config and never reaches the original directory
or the network. LoRA adapters (peft) are merged into the weights
before saving, so a bundle serves without peft and with no adapter overhead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from pydantic import JsonValue
from torch import nn

from kiln.errors import SpecError
from kiln.models.registry import register
from kiln.spec.model import PretrainedSpec

PKG_PREFIX = "pkg:"


def resolve_model_path(path: str) -> str:
    """``pkg:<package>/<sub/dir>`` -> that folder inside the installed package; else as is.

    The package is located without importing it (nothing of it runs).
    """
    if not path.startswith(PKG_PREFIX):
        return path
    package, _, sub = path.removeprefix(PKG_PREFIX).partition("/")
    if not package.isidentifier():
        # A dotted name would import its parent packages to be found; use pkg:a/b instead.
        raise SpecError(
            f"{path}: name a top-level package, then the folder (pkg:<package>/<sub/dir>)",
            field="model.path",
        )
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(f"no installed package {package!r} for {path}", field="model.path")
    root = Path(next(iter(spec.submodule_search_locations)))
    resolved = (root / sub).resolve()
    if root.resolve() not in (resolved, *resolved.parents):
        raise SpecError(f"{path} points outside the package", field="model.path")
    return str(resolved)


def local_model_dir(path: str) -> Path | None:
    """The directory for a local path (checked to hold a config.json), None for a hub id
    when ``KILN_ALLOW_HUB`` allows downloads; otherwise a hub id is a SpecError.

    The messages tell a missing folder from one without config.json: they are for the
    user of this machine. A server never passes a caller's path here (its jobs name
    ``base:<name>`` and get a verified copy), so they reveal nothing through it.
    """
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith((".", "~")) or p.exists()
    if path.startswith("base:") and not looks_local:
        raise SpecError(
            f"{path} names a base model of a kiln server's catalog: submit the spec to the "
            "server (kiln jobs submit), or give a model directory here",
            field="model.path",
        )
    if not looks_local:
        from kiln.settings import get_settings

        if get_settings().allow_hub:
            return None
        raise SpecError(
            f"{path}: not a local directory; a Hugging Face hub id downloads only with "
            "KILN_ALLOW_HUB=1 (or give the path of a downloaded model directory)",
            field="model.path",
        )
    p = p.expanduser()
    if not p.is_dir():
        raise SpecError(f"model directory not found: {path}", field="model.path")
    if not (p / "config.json").is_file():
        raise SpecError(
            f"{path} has no config.json; is it a Hugging Face model directory?",
            field="model.path",
        )
    return p


class HFClassifier(nn.Module):
    """Tokens (B, 2, L) [ids; mask] -> a Hugging Face model's logits (B, O)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.hf(input_ids=x[:, 0], attention_mask=x[:, 1])
        return out.logits  # type: ignore[no-any-return]

    def hf_config(self) -> dict[str, JsonValue]:
        """The architecture's config as JSON (what a bundle needs to rebuild it)."""
        hf: Any = self.hf
        config: dict[str, JsonValue] = hf.config.to_dict()
        return config

    def merge_adapters(self) -> None:
        """Fold LoRA adapters into the base weights (no-op without adapters)."""
        if not type(self.hf).__module__.startswith("peft"):
            return  # no adapters; and peft need not be imported
        from peft import PeftModel

        if isinstance(self.hf, PeftModel):
            self.hf = self.hf.merge_and_unload()


@register("pretrained")
def build_pretrained(
    spec: PretrainedSpec, n_inputs: int, n_outputs: int, **context: Any
) -> nn.Module:
    """From ``context['hf_config']`` (a bundle: empty weights to be loaded), or else from
    ``spec.path`` with its pretrained weights and a new head of ``n_outputs``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized head" is expected here
    hf_logging.disable_progress_bar()  # kiln shows its own progress
    if "hf_config" in context:
        cfg = dict(context["hf_config"])
        model_type = cfg.pop("model_type")
        config = AutoConfig.for_model(model_type, **cfg)
        return HFClassifier(AutoModelForSequenceClassification.from_config(config))

    path = resolve_model_path(spec.path)
    local = local_model_dir(path) is not None  # a hub id only where KILN_ALLOW_HUB says so
    problem = "regression" if n_outputs == 1 else "single_label_classification"
    try:
        config = AutoConfig.from_pretrained(
            path,
            num_labels=n_outputs,
            problem_type=problem,
            trust_remote_code=False,
            local_files_only=local,
        )
        hf = AutoModelForSequenceClassification.from_pretrained(
            path,
            config=config,
            trust_remote_code=False,
            local_files_only=local,
            # a fine-tuned model's head may have another number of labels: a new head
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise SpecError(
            f"cannot load a pretrained model from {spec.path}: {str(exc).splitlines()[0]}",
            field="model.path",
        ) from None
    vocab = hf.get_input_embeddings().num_embeddings
    if n_inputs > vocab:
        raise SpecError(
            f"the tokenizer has {n_inputs} tokens but the model's embeddings only {vocab}: "
            "tokenizer and model do not match",
            field="model.path",
        )
    _freeze(hf, spec.freeze)
    if spec.lora is not None:
        hf = _with_lora(hf, spec)
    return HFClassifier(hf)


def _freeze(hf: nn.Module, what: str) -> None:
    """``embeddings``: the embedding layer; ``encoder``: everything but the head."""
    if what == "none":
        return
    base = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    if base is None:
        raise SpecError("cannot tell this model's encoder from its head", field="model.freeze")
    # "embeddings": the whole embedding block (tokens, positions, types, its norm).
    embeddings = getattr(base, "embeddings", None) or base.get_input_embeddings()
    frozen = embeddings if what == "embeddings" else base
    for p in frozen.parameters():
        p.requires_grad_(False)


def _with_lora(hf: nn.Module, spec: PretrainedSpec) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    assert spec.lora is not None
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
    )
    try:
        return get_peft_model(hf, config)
    except ValueError as exc:
        raise SpecError(f"LoRA does not apply: {exc}", field="model.lora") from None
