"""The generation recipe: examples -> tokenizer -> encoded splits -> causal LM -> trained LM.

What :func:`kiln.fit` runs for ``task: generation``. The examples (chat, completion or
text) are split by example; the tokenizer is the pretrained model's own (``causal_lm``)
or a byte-level BPE learned from the training split (``gpt``); each split is encoded
with the chat template and answer-only labels (:mod:`kiln.data.lm_encode`) and the
engine trains on token inputs (B, 2, L) against labels (B, L).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import JsonValue

from kiln.data.dialogs import Corpus, Example, LMFormat, read_corpus
from kiln.data.lm_encode import Encoded, encode_examples, ensure_chat_template
from kiln.data.split import Holdout, holdout
from kiln.errors import DataError, NotFoundError
from kiln.evaluate.metrics import Metrics
from kiln.evaluate.token_loss import mean_token_loss, perplexity
from kiln.models.causal_lm import CausalLM
from kiln.models.registry import build
from kiln.spec.model import CausalLMSpec, GPTSpec
from kiln.spec.spec import Spec
from kiln.train.callbacks import Callback
from kiln.train.checkpoint import CheckpointStore
from kiln.train.executor import Executor
from kiln.train.loop import FitResult, TensorData, fit_model
from kiln.train.recipe import run_id

VALIDATION = "data.validation"  # the spec field of a separate validation source


@dataclass(frozen=True)
class LMSplits:
    """The corpus split by example: positions into ``corpus.examples``; with a separate
    validation source (``data.validation``) its examples are the val split instead."""

    corpus: Corpus
    parts: Holdout
    validation: Corpus | None = None

    def examples(self, part: str) -> list[Example]:
        if part == "val" and self.validation is not None:
            return list(self.validation.examples)
        return [self.corpus.examples[i] for i in getattr(self.parts, part)]

    @property
    def fingerprint(self) -> str:
        """The training corpus's fingerprint, joined with the validation source's."""
        if self.validation is None:
            return self.corpus.fingerprint
        joined = f"{self.corpus.fingerprint}+validation:{self.validation.fingerprint}"
        return "sha256:" + hashlib.sha256(joined.encode()).hexdigest()


@dataclass
class LMTrained:
    """A trained causal LM with its tokenizer, the encoded splits and how it trained."""

    model: CausalLM
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    result: FitResult
    context: dict[str, JsonValue]  # what the bundle needs to rebuild the architecture
    splits: LMSplits
    encoded: dict[str, Encoded]  # per split present: train, val, test
    template_added: bool  # the tokenizer had no chat template: kiln's default was set

    @property
    def format(self) -> LMFormat:
        return self.splits.corpus.format


def read_splits(spec: Spec) -> LMSplits:
    """Read and validate the examples, then split them (a seeded shuffle, no strata);
    ``data.validation`` is read with the same checks, in the training data's format."""
    text = spec.data.text
    if isinstance(text, list):
        if len(text) != 1:
            raise DataError("generation data takes one text column", field="data.text")
        text = text[0]
    corpus = read_corpus(spec.data.source, spec.data.format, text)
    if text is not None and corpus.format != "text":
        raise DataError(
            f"data.text: names the text column, but {spec.data.source} holds {corpus.format} "
            "records (set data.format: text to read it as text)",
            field="data.text",
        )
    keys = pd.Series(np.zeros(len(corpus.examples)))
    parts = holdout(keys, spec.data.split, stratify=False)
    validation = None
    if spec.data.validation is not None:
        validation = _read_validation(spec.data.validation, corpus.format, text)
    return LMSplits(corpus=corpus, parts=parts, validation=validation)


def _read_validation(source: str, fmt: LMFormat, text: str | None) -> Corpus:
    """The validation source's examples, in the training data's format (DataError, or
    NotFoundError for a missing file, naming ``data.validation``)."""
    try:
        return read_corpus(source, fmt, text)
    except DataError as exc:
        raise DataError(f"data.validation: {exc.message}", field=VALIDATION) from None
    except NotFoundError as exc:
        raise NotFoundError(f"data.validation: {exc.message}", field=VALIDATION) from None


def train_lm(
    spec: Spec,
    splits: LMSplits,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoints: CheckpointStore | None = None,
    resume: bool = False,
    executor: Executor | None = None,
) -> LMTrained:
    """Tokenize, build and train the model ``spec`` describes on ``splits`` (on
    ``executor``'s cluster when the spec sets ``train.resources``)."""
    model_spec = spec.model
    assert isinstance(model_spec, CausalLMSpec | GPTSpec)
    tokenizer = _tokenizer(model_spec, splits.examples("train"))
    template_added = ensure_chat_template(tokenizer)
    encoded = _encode_splits(spec, tokenizer, splits)
    context = token_context(tokenizer)
    torch.manual_seed(spec.train.seed)  # a gpt's initial weights, LoRA's A matrices
    model = build(model_spec, len(tokenizer), len(tokenizer), **context)
    assert isinstance(model, CausalLM)
    train = encoded["train"]
    data = TensorData(
        x_train=torch.from_numpy(train.tensor()), y_train=torch.from_numpy(train.labels)
    )
    if "val" in encoded:
        data.x_val = torch.from_numpy(encoded["val"].tensor())
        data.y_val = torch.from_numpy(encoded["val"].labels)
    result = fit_model(
        model,
        data,
        spec.train,
        spec.task,
        spec.resolved_loss,
        callbacks=callbacks,
        checkpoints=checkpoints,
        resume=resume,
        run_id=run_id(_unlocated(spec), splits.fingerprint),
        executor=executor,
    )
    lora = getattr(model_spec, "lora", None)
    if lora is None or lora.merge:
        model.merge_adapters()
    else:  # the bundle keeps the adapter and references the base weights
        from kiln.models.lm_source import resolve_lm_source, weights_digest

        assert isinstance(model_spec, CausalLMSpec)
        source = resolve_lm_source(model_spec.path)
        context["base"] = {"path": model_spec.path, "sha256": weights_digest(source)}
    context["hf_config"] = model.hf_config()
    return LMTrained(
        model=model,
        tokenizer=tokenizer,
        result=result,
        context=context,
        splits=splits,
        encoded=encoded,
        template_added=template_added,
    )


def _unlocated(spec: Spec) -> Spec:
    """``spec`` without where its validation set is (a job's worker reads a fresh copy
    on every attempt): it counts by content, in :attr:`LMSplits.fingerprint`."""
    if spec.data.validation is None:
        return spec
    return spec.model_copy(update={"data": spec.data.model_copy(update={"validation": "-"})})


def _tokenizer(model: CausalLMSpec | GPTSpec, train: list[Example]) -> Any:
    """The pretrained model's tokenizer, or a BPE learned from the training examples."""
    if isinstance(model, CausalLMSpec):
        from kiln.models.lm_source import load_lm_tokenizer, resolve_lm_source

        return load_lm_tokenizer(resolve_lm_source(model.path))
    from kiln.data.bpe import train_bpe_tokenizer

    return train_bpe_tokenizer(list(example_texts(train)), model.vocab_size)


def example_texts(examples: Sequence[Example]) -> list[str]:
    """Every piece of text in ``examples``, in order (what a BPE learns from)."""
    texts: list[str] = []
    for ex in examples:
        if ex.messages is not None:
            texts.extend(m.content for m in ex.messages)
        texts.extend(t for t in (ex.prompt, ex.completion, ex.text) if t is not None)
    return texts


def _encode_splits(spec: Spec, tokenizer: Any, splits: LMSplits) -> dict[str, Encoded]:
    """Encode each split present; held-out splits are never packed (one row per example)."""
    max_length = spec.model.max_length  # type: ignore[union-attr]
    out: dict[str, Encoded] = {}
    for part in ("train", "val", "test"):
        examples = splits.examples(part)
        if not examples:
            continue
        out[part] = encode_examples(
            tokenizer,
            examples,
            splits.corpus.format,
            max_length=max_length,
            loss_on=spec.train.loss_on,
            packing=spec.train.packing and part == "train",
        )
    if out["train"].trained_tokens == 0:
        raise DataError("the training split has no tokens to train on", field="data.source")
    return out


def token_context(tokenizer: Any) -> dict[str, JsonValue]:
    """The special-token ids a ``gpt`` is built with (and generation stops on)."""
    return {
        "pad_id": int(tokenizer.pad_token_id),
        "bos_id": None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id),
        "eos_id": None if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id),
    }


def score_encoded(model: CausalLM, encoded: Encoded, batch: int = 8) -> Metrics:
    """Loss and perplexity of ``model`` over a split's labelled tokens."""
    x = torch.from_numpy(encoded.tensor())
    y = torch.from_numpy(encoded.labels)
    loss = mean_token_loss(model, x, y, batch)
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "tokens": encoded.trained_tokens,
        "rows": len(x),
    }
