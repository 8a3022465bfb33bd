"""Causal language models: a pretrained one fine-tuned (``causal_lm``), or a small
Llama-style decoder trained from scratch (``gpt``).

Both are a :class:`CausalLM`, which wraps a transformers ``PreTrainedModel`` (a peft
``PeftModel`` while LoRA adapters train) and maps tokens (B, 2, L) [ids; mask] to
next-token logits (B, L, V). A bundle stores the model's config (``hf_config``) and its
state dict; ``context["hf_config"]`` rebuilds the architecture with ``from_config``
(no weights read) for that state dict to load into.

Tied embeddings: the input embedding and the LM head share one tensor, which
safetensors refuses to save twice. :class:`CausalLM`'s state dict therefore holds each
shared tensor once (under its first name), and loading a state dict fills the other
names from it, so ``save_file(model.state_dict())`` and a strict ``load_state_dict`` of
that file round-trip with the tie intact.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from pydantic import JsonValue
from torch import nn

from kiln.errors import SpecError
from kiln.models.registry import register
from kiln.spec.model import CausalLMSpec, GPTSpec, LMLoraSpec

if TYPE_CHECKING:  # transformers loads only when a causal LM is built (registry imports us)
    from transformers import PreTrainedModel


class CausalLM(nn.Module):
    """Tokens (B, 2, L) [ids; mask] -> next-token logits (B, L, V)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_aliases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no KV cache while training or scoring whole sequences
        out = self.hf(input_ids=x[:, 0], attention_mask=x[:, 1], use_cache=False)
        return cast(torch.Tensor, out.logits)  # (B, L, V)

    def base_model(self) -> PreTrainedModel:
        """The transformers model (for generation). With unmerged LoRA adapters, the
        model they are injected into (they stay active)."""
        if _is_peft(self.hf):
            return cast("PreTrainedModel", cast(Any, self.hf).get_base_model())
        return cast("PreTrainedModel", self.hf)

    def hf_config(self) -> dict[str, JsonValue]:
        """The architecture's config as JSON (what a bundle needs to rebuild it). A GGUF
        source's ``quantization_config`` is left out: its weights are dequantised, and
        the bundle holds them in float."""
        config: dict[str, JsonValue] = self.base_model().config.to_dict()
        quant = config.get("quantization_config")
        if isinstance(quant, dict) and quant.get("quant_method") == "gguf":
            del config["quantization_config"]
        return config

    def merge_adapters(self) -> None:
        """Fold LoRA adapters into the base weights (no-op without adapters)."""
        if _is_peft(self.hf):
            self.hf = cast(Any, self.hf).merge_and_unload()


def _is_peft(module: nn.Module) -> bool:
    # peft need not be imported to tell
    return type(module).__module__.startswith("peft")


def _aliases(module: nn.Module) -> dict[str, str]:
    """{parameter name: the first name of the same parameter} for tied weights (names
    in state-dict order, so "first" is the name a state dict lists first)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        source = first.setdefault(id(param), name)
        if source != name:
            aliases[name] = source
    return aliases


def _drop_aliases(
    module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """State-dict post hook: keep each shared tensor once (safetensors needs that)."""
    for key in _aliases(module):
        state.pop(prefix + key, None)


def _fill_aliases(
    module: nn.Module,
    state: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load-state-dict pre hook: a tied key absent from ``state`` takes its source's
    tensor (the same values, loaded into the one shared parameter)."""
    for key, source in _aliases(module).items():
        if prefix + key not in state and prefix + source in state:
            state[prefix + key] = state[prefix + source]


# ---- builders ----------------------------------------------------------------------


@register("causal_lm")
def build_causal_lm(spec: CausalLMSpec, n_inputs: int, n_outputs: int, **context: Any) -> nn.Module:
    """From ``context['hf_config']`` (a bundle: empty weights to be loaded), or else the
    pretrained weights of ``spec.path`` (+ LoRA adapters if ``spec.lora``).

    ``n_inputs`` is the tokenizer's size; it must fit the model's embeddings.
    """
    if "hf_config" in context:
        return CausalLM(_from_hf_config(context["hf_config"]))
    from kiln.models.lm_source import load_pretrained_lm, resolve_lm_source

    hf = load_pretrained_lm(resolve_lm_source(spec.path))
    vocab = hf.get_input_embeddings().weight.shape[0]  # type: ignore[index]
    if n_inputs > vocab:
        raise SpecError(
            f"the tokenizer has {n_inputs} tokens but the model's embeddings only {vocab}: "
            "tokenizer and model do not match",
            field="model.path",
        )
    if spec.lora is not None:
        return CausalLM(with_lora(hf, spec.lora))
    return CausalLM(hf)


@register("gpt")
def build_gpt(spec: GPTSpec, n_inputs: int, n_outputs: int, **context: Any) -> nn.Module:
    """A Llama-style decoder with fresh weights, vocabulary ``n_inputs`` (the learnt BPE
    tokenizer's size), tied input/output embeddings. ``context``: ``pad_id``, ``bos_id``,
    ``eos_id`` (the tokenizer's), or ``hf_config`` (a bundle). Seeding is the caller's
    job (``torch.manual_seed`` before building)."""
    if "hf_config" in context:
        return CausalLM(_from_hf_config(context["hf_config"]))
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=n_inputs,
        hidden_size=spec.dim,
        intermediate_size=spec.ff_dim or 4 * spec.dim,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_length,
        pad_token_id=context.get("pad_id"),
        bos_token_id=context.get("bos_id"),
        eos_token_id=context.get("eos_id"),
        tie_word_embeddings=True,
        attention_dropout=spec.dropout,  # the Llama block's only dropout
    )
    return CausalLM(AutoModelForCausalLM.from_config(config))


def _from_hf_config(hf_config: Mapping[str, Any]) -> PreTrainedModel:
    """The architecture of a saved config, with fresh weights (no file is read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hf_config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    return cast("PreTrainedModel", AutoModelForCausalLM.from_config(config))


# ---- LoRA --------------------------------------------------------------------------


def lora_targets(hf: PreTrainedModel) -> list[str]:
    """``target: auto``: the names (last component) of every linear projection of
    attention and MLP, i.e. every ``nn.Linear`` (or GPT-2's ``Conv1D``) but the LM head."""
    from transformers.pytorch_utils import Conv1D

    head = hf.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in hf.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head
    }
    head_names = {n.rsplit(".", 1)[-1] for n, m in hf.named_modules() if m is head}
    return sorted(names - head_names)


def with_lora(hf: PreTrainedModel, lora: LMLoraSpec) -> nn.Module:
    """``hf`` wrapped as a peft model with LoRA adapters (base weights frozen)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D

    available = lora_targets(hf)
    targets = available if lora.target == "auto" else list(lora.target)
    module_names = {name.rsplit(".", 1)[-1] for name, _ in hf.named_modules()}
    unmatched = [t for t in targets if t not in module_names]
    if not targets or unmatched:
        raise SpecError(
            f"LoRA targets {unmatched or targets} match no module of this model; "
            f"its linear projections: {available}",
            field="model.lora.target",
        )
    # GPT-2's Conv1D stores its weight transposed (in, out)
    conv = any(
        isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in hf.named_modules()
    )
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        fan_in_fan_out=conv,
    )
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated is_gradient_checkpointing (peft's to fix)
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            return cast(nn.Module, get_peft_model(hf, config))
    except ValueError as exc:
        raise SpecError(f"LoRA does not apply: {exc}", field="model.lora") from None
