"""``kiln.fit`` for ``task: generation``: from a spec to a trained causal-LM bundle."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import JsonValue
from torch import nn

from kiln.bundle import new_meta
from kiln.data.dialogs import Example, LMFormat
from kiln.data.lm_encode import ensure_chat_template
from kiln.data.sources import absolute_source
from kiln.errors import DataError
from kiln.evaluate.metrics import Metrics
from kiln.lm_bundle import EmbeddingBundle, GenerationDefaults, LMBundle
from kiln.manifest import (
    BundleMeta,
    DataRecord,
    Lineage,
    ParentRecord,
    SplitRecord,
    TokenRecord,
    TrainingRecord,
)
from kiln.models.causal_lm import CausalLM
from kiln.models.registry import build
from kiln.models.summary import count_parameters
from kiln.spec.model import CausalLMSpec, ModelSpec, SentenceEncoderSpec
from kiln.spec.spec import Spec
from kiln.train.callbacks import Callback
from kiln.train.checkpoint import CheckpointStore
from kiln.train.executor import Executor
from kiln.train.lm_recipe import LMTrained, read_splits, score_encoded, token_context, train_lm


def fit_lm(
    spec: Spec,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoints: CheckpointStore | None = None,
    resume: bool = False,
    executor: Executor | None = None,
) -> LMBundle:
    """Train the LM ``spec`` describes (on ``executor`` when it sets ``train.resources``);
    loss and perplexity measured on val and test."""
    started = time.perf_counter()
    splits = read_splits(spec)
    trained = train_lm(
        spec,
        splits,
        callbacks=callbacks,
        checkpoints=checkpoints,
        resume=resume,
        executor=executor,
    )
    trained.model.cpu()
    metrics: dict[str, Metrics] = {
        part: score_encoded(trained.model, trained.encoded[part], batch=_eval_batch(spec))
        for part in ("test", "val")
        if part in trained.encoded
    }
    meta = _manifest(spec, trained, metrics, seconds=time.perf_counter() - started)
    defaults = generation_defaults(
        trained.model,
        trained.tokenizer,
        trained.format,
        trained.template_added,
        trained.splits.examples("train"),
    )
    return LMBundle(meta, trained.model, trained.tokenizer, defaults)


def _eval_batch(spec: Spec) -> int:
    batch = spec.train.batch_size
    return batch if isinstance(batch, int) else 8


def generation_defaults(
    model: CausalLM,
    tokenizer: Any,
    fmt: LMFormat,
    template_added: bool,
    examples: Sequence[Example] = (),
) -> GenerationDefaults:
    """Generation defaults: greedy, stopping at the tokenizer's end-of-sequence (and the
    model's own end tokens where its generation config names others); the system
    message every training chat began with, if they all began with the same one."""
    eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    extra = getattr(getattr(model.base_model(), "generation_config", None), "eos_token_id", None)
    if isinstance(extra, int):
        eos.add(extra)
    elif isinstance(extra, list):
        eos.update(int(e) for e in extra)
    if not eos:
        raise DataError("the tokenizer has no end-of-sequence token", field="model.path")
    return GenerationDefaults(
        eos_ids=sorted(eos),
        prompt_format=fmt,
        default_chat_template=template_added,
        system=shared_system(examples),
    )


def shared_system(examples: Sequence[Example]) -> str | None:
    """The system message all ``examples`` open with; None if any opens otherwise."""
    firsts = {
        ex.messages[0].content if ex.messages and ex.messages[0].role == "system" else None
        for ex in examples
    }
    return firsts.pop() if len(firsts) == 1 else None


def lm_meta(
    name: str,
    spec: ModelSpec,
    model: nn.Module,
    tokenizer: Any,
    *,
    context: dict[str, JsonValue],
    metrics: dict[str, Metrics] | None = None,
    training: TrainingRecord | None = None,
    lineage: Lineage | None = None,
    parent: ParentRecord | None = None,
) -> BundleMeta:
    """The manifest of a language-model bundle: ``embedding`` for a sentence encoder
    (vectors of its width), else ``generation`` (text in, tokens out); an imported model's
    lineage is its ``parent``, the weights it came from."""
    embedding = isinstance(spec, SentenceEncoderSpec)
    vocab = len(tokenizer)
    return new_meta(
        name=name,
        task="embedding" if embedding else "generation",
        model=spec.model_dump(mode="json"),
        input_schema=[{"name": "input" if embedding else "prompt", "kind": "text"}],
        target="",
        labels=None,
        n_inputs=vocab,
        n_outputs=getattr(model, "dimensions", vocab) if embedding else vocab,
        model_context=context,
        parameters=count_parameters(model),
        metrics=metrics or {},
        training=training or TrainingRecord(),
        lineage=lineage or Lineage(parent=parent),
    )


def _manifest(
    spec: Spec, trained: LMTrained, metrics: dict[str, Metrics], *, seconds: float
) -> BundleMeta:
    result, parts = trained.result, trained.splits.parts
    train_enc = trained.encoded["train"]
    history = result.history
    return lm_meta(
        spec.name,
        spec.model,
        trained.model,
        trained.tokenizer,
        context=trained.context,
        metrics=metrics,
        training=TrainingRecord(
            epochs_run=result.epochs_run,
            best_epoch=result.best_epoch,
            stopped_early=result.stopped_early,
            resumed_from_epoch=result.resumed_from,
            seconds=round(seconds, 3),
            device=result.device,
            loss=spec.resolved_loss,
            history=history,
            tokens=TokenRecord(
                tokens=train_enc.tokens,
                trained=train_enc.trained_tokens,
                truncated=len(train_enc.truncated),
                truncated_lines=train_enc.truncated[:20],
            ),
        ),
        lineage=Lineage(
            spec=spec.model_dump(mode="json"),
            data=DataRecord(
                source=absolute_source(spec.data.source),
                fingerprint=trained.splits.corpus.fingerprint,
                rows_read=len(trained.splits.corpus.examples),
                rows_dropped=0,
            ),
            # val: the data.validation source's examples where the spec names one
            split=SplitRecord(
                train=len(parts.train),
                val=len(trained.splits.examples("val")),
                test=len(parts.test),
            ),
        ),
    )


def import_pretrained(
    source: str, *, name: str | None = None, max_length: int | None = None
) -> LMBundle | EmbeddingBundle:
    """A pretrained model as a bundle, without training: a causal LM becomes a
    ``generation`` bundle, a sentence encoder (BERT-style) an ``embedding`` bundle
    (mean pooling, normalised). The source's weights are recorded in the lineage by
    path and SHA-256."""
    from kiln.models.lm_source import (
        is_sentence_encoder,
        load_lm_tokenizer,
        resolve_lm_source,
        weights_digest,
    )

    located = resolve_lm_source(source)
    bundle_name = name or _default_name(source)
    tokenizer = load_lm_tokenizer(located)
    parent = ParentRecord(name=source, path=located.display, weights_sha256=weights_digest(located))
    if is_sentence_encoder(located):
        return _import_encoder(source, bundle_name, tokenizer, parent, max_length)
    spec = CausalLMSpec(path=source, max_length=max_length or 2048)
    template_added = ensure_chat_template(tokenizer)
    context: dict[str, JsonValue] = token_context(tokenizer)
    model = build(spec, len(tokenizer), len(tokenizer), **context)
    assert isinstance(model, CausalLM)
    context["hf_config"] = model.hf_config()
    positions = getattr(model.base_model().config, "max_position_embeddings", None)
    if max_length is None and isinstance(positions, int):
        spec = spec.model_copy(update={"max_length": min(positions, 8192)})
    meta = lm_meta(bundle_name, spec, model, tokenizer, context=context, parent=parent)
    defaults = generation_defaults(model, tokenizer, "chat", template_added)
    return LMBundle(meta, model, tokenizer, defaults)


def _import_encoder(
    source: str, name: str, tokenizer: Any, parent: ParentRecord, max_length: int | None
) -> EmbeddingBundle:
    from kiln.models.sentence_encoder import SentenceEncoder

    spec = SentenceEncoderSpec(path=source, max_length=max_length or 256)
    model = build(spec, len(tokenizer), 1)
    assert isinstance(model, SentenceEncoder)
    context: dict[str, JsonValue] = {
        "hf_config": model.hf_config(),
        "pad_id": int(tokenizer.pad_token_id),
    }
    meta = lm_meta(name, spec, model, tokenizer, context=context, parent=parent)
    return EmbeddingBundle(meta, model, tokenizer)


def _default_name(source: str) -> str:
    """A bundle name from the source's last path part (``SmolLM2-135M-Instruct``), or
    the package's name for ``pkg:<package>/model``-style sources."""
    path = Path(source.removeprefix("pkg:").rstrip("/"))
    stem = path.name
    if source.startswith("pkg:") and stem in ("model", "models", "weights") and path.parts:
        stem = path.parts[0]
    for suffix in (".gguf",):
        stem = stem.removesuffix(suffix)
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:64]
    return cleaned or "imported"
