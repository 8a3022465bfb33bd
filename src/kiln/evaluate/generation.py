"""Scores for generated text against reference answers.

Inputs are plain strings (one prediction per reference); outputs are a
:class:`TextScores` with the set's means and one :class:`ExampleScore` per pair.
ROUGE-L comes from the ``rouge-score`` package (perplexity: :mod:`kiln.evaluate.token_loss`).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from kiln.errors import DataError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NOT_JSON = object()  # what _parse_json returns for text that is not JSON


@dataclass(frozen=True)
class ExampleScore:
    """One prediction scored against its reference.

    ``json_ok`` is None when the set's references are not all JSON; else whether the
    prediction parses as JSON equal to the reference's.
    """

    prediction: str
    reference: str
    exact: bool
    normalized: bool
    rouge_l: float
    json_ok: bool | None


@dataclass(frozen=True)
class TextScores:
    """A set's scores: fractions in [0, 1] over ``n`` pairs, and the rows behind them.

    ``json_match`` is None when any reference does not parse as JSON.
    """

    exact_match: float
    normalized_match: float
    rouge_l: float
    json_match: float | None
    n: int
    rows: list[ExampleScore]

    def summary(self) -> dict[str, float | int]:
        """The set's numbers, JSON-ready (``json_match`` left out when undefined)."""
        out: dict[str, float | int] = {
            "exact_match": self.exact_match,
            "normalized_match": self.normalized_match,
            "rouge_l": self.rouge_l,
            "n": self.n,
        }
        if self.json_match is not None:
            out["json_match"] = self.json_match
        return out


def normalize_text(s: str) -> str:
    """SQuAD's answer normalisation: lower case, ASCII punctuation and the articles
    a/an/the removed, runs of whitespace collapsed to one space, ends stripped."""
    s = s.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> TextScores:
    """Exact, normalised-exact, ROUGE-L (F-measure) and JSON matches of each
    prediction against the reference at the same position.

    ROUGE-L uses rouge-score's default tokenizer (lower case, alphanumeric runs only,
    no stemming), so two texts without any word score 0 even when equal.
    Raises DataError when the sequences differ in length or are empty.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise DataError(
            f"{len(predictions)} predictions for {len(references)} references",
            field="predictions",
        )
    if not references:
        raise DataError("no examples to score", field="references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    parsed_refs = [_parse_json(r) for r in references]
    refs_are_json = all(p is not _NOT_JSON for p in parsed_refs)
    rows = []
    for pred, ref, ref_json in zip(predictions, references, parsed_refs, strict=True):
        json_ok = _json_equal(_parse_json(pred), ref_json) if refs_are_json else None
        rows.append(
            ExampleScore(
                prediction=pred,
                reference=ref,
                exact=pred == ref,
                normalized=normalize_text(pred) == normalize_text(ref),
                rouge_l=float(scorer.score(ref, pred)["rougeL"].fmeasure),
                json_ok=json_ok,
            )
        )
    n = len(rows)
    return TextScores(
        exact_match=sum(r.exact for r in rows) / n,
        normalized_match=sum(r.normalized for r in rows) / n,
        rouge_l=sum(r.rouge_l for r in rows) / n,
        json_match=sum(bool(r.json_ok) for r in rows) / n if refs_are_json else None,
        n=n,
        rows=rows,
    )


def _parse_json(text: str) -> object:
    """The JSON value ``text`` holds, or ``_NOT_JSON``."""
    try:
        return json.loads(text)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return _NOT_JSON


def _json_equal(a: object, b: object) -> bool:
    """JSON equality: like ``==`` but true/false never equal the numbers 1/0
    (Python's ``True == 1`` would let ``{"n": true}`` match ``{"n": 1}``)."""
    if a is _NOT_JSON or b is _NOT_JSON:
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b
