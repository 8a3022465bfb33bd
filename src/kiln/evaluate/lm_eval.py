"""Evaluating a language model on examples: token loss and perplexity, and, for chat
and completion data, answers generated and scored against the references.

The answer of a chat is its last assistant turn: the model sees every message before
it and generates greedily; a completion's answer is its completion. Text corpora get
loss and perplexity only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kiln.data.dialogs import Example, LMFormat, Message
from kiln.data.lm_encode import encode_examples
from kiln.evaluate.generation import ExampleScore, text_scores
from kiln.evaluate.metrics import Metrics
from kiln.evaluate.token_loss import mean_token_loss, perplexity
from kiln.runtime.generation import Generator, SamplingParams

PromptFn = Callable[[list[Message] | str], list[int]]
"""A question (chat messages before the answer, or a completion's prompt) -> token ids."""


@dataclass(frozen=True)
class Answered:
    """One held-out example's prompt, reference answer and generated answer."""

    line: int
    prompt: str
    reference: str
    prediction: str
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class LMEvaluation:
    """The metrics, and one row per generated answer (empty for text corpora)."""

    metrics: Metrics
    answers: list[Answered]
    scores: list[ExampleScore]


def evaluate_lm(
    model: nn.Module | None,
    tokenizer: Any,
    generator: Generator,
    examples: Sequence[Example],
    fmt: LMFormat,
    *,
    max_length: int,
    params: SamplingParams,
    prompt: PromptFn,
    batch: int = 8,
    budget: bool = True,
) -> LMEvaluation:
    """Loss/perplexity (when ``model``, the torch module, is given) and generation scores.

    ``prompt`` turns a question (chat messages or a completion prompt) into token ids
    exactly as the bundle's own ``generate`` does. With
    ``budget``, answers stop at :func:`answer_budget` new tokens when that is fewer than
    ``params.max_new_tokens``: an answer that long can no longer match its reference.
    """
    metrics: Metrics = {"rows": len(examples)}
    if model is not None:
        encoded = encode_examples(
            tokenizer, examples, fmt, max_length=max_length, loss_on="assistant", packing=False
        )
        x, y = torch.from_numpy(encoded.tensor()), torch.from_numpy(encoded.labels)
        loss = mean_token_loss(model, x, y, batch)
        metrics.update(
            {"loss": loss, "perplexity": perplexity(loss), "tokens": encoded.trained_tokens}
        )
    if fmt == "text":
        return LMEvaluation(metrics=metrics, answers=[], scores=[])
    if budget:
        params = dataclasses.replace(
            params, max_new_tokens=min(params.max_new_tokens, answer_budget(tokenizer, examples))
        )
    answers = _answer(generator, examples, params, prompt=prompt, batch=batch)
    scores = text_scores([a.prediction for a in answers], [a.reference for a in answers])
    summary = scores.summary()
    for key in ("exact_match", "normalized_match", "rouge_l", "json_match"):
        if key in summary:
            metrics[key] = float(summary[key])
    return LMEvaluation(metrics=metrics, answers=answers, scores=scores.rows)


def answer_budget(tokenizer: Any, examples: Sequence[Example]) -> int:
    """New tokens enough for any reference answer: 1.5 x the longest, plus 8."""
    longest = max((len(tokenizer.encode(question(ex)[1])) for ex in examples), default=0)
    return int(longest * 1.5) + 8


def question(example: Example) -> tuple[list[Message] | str, str]:
    """What the model is asked and the reference answer: a chat's messages before its
    last assistant turn and that turn; a completion's prompt and completion."""
    if example.messages is not None:
        messages = list(example.messages)
        last = max(i for i, m in enumerate(messages) if m.role == "assistant")
        return messages[:last], messages[last].content
    assert example.prompt is not None and example.completion is not None
    return example.prompt, example.completion


def _answer(
    generator: Generator,
    examples: Sequence[Example],
    params: SamplingParams,
    *,
    prompt: PromptFn,
    batch: int,
) -> list[Answered]:
    asked = [question(ex) for ex in examples]
    ids = [prompt(q) for q, _ in asked]
    answers: list[Answered] = []
    for start in range(0, len(ids), batch):
        done = generator.generate(ids[start : start + batch], params)
        for ex, (q, ref), c in zip(
            examples[start : start + batch], asked[start : start + batch], done, strict=True
        ):
            answers.append(
                Answered(
                    line=ex.line,
                    prompt=q if isinstance(q, str) else q[-1].content,
                    reference=ref,
                    prediction=c.text.strip(),
                    finish_reason=c.finish_reason,
                    completion_tokens=c.completion_tokens,
                )
            )
    return answers
