"""Generation scores on hand-made strings, each checked against a figure worked out by hand."""

from __future__ import annotations

import math

import pytest

from kiln.errors import DataError
from kiln.evaluate.generation import normalize_text, text_scores
from kiln.evaluate.token_loss import perplexity


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The  Cat, sat!", "cat sat"),
        ("  an apple\tA DAY\n", "apple day"),
        ("theatre then", "theatre then"),  # articles only as whole words
        ("Oslo.", "oslo"),
        ("", ""),
    ],
)
def test_normalize_text_is_squad_style(raw: str, normalized: str) -> None:
    assert normalize_text(raw) == normalized


def test_exact_and_normalized_match_count_pairs() -> None:
    got = text_scores(["Paris", "the paris.", "London"], ["Paris", "Paris", "Paris"])
    assert got.n == 3
    assert got.exact_match == pytest.approx(1 / 3)
    assert got.normalized_match == pytest.approx(2 / 3)
    assert [r.exact for r in got.rows] == [True, False, False]
    assert [r.normalized for r in got.rows] == [True, True, False]
    assert got.rows[1].prediction == "the paris." and got.rows[1].reference == "Paris"
    assert got.json_match is None  # "Paris" is not JSON
    assert all(r.json_ok is None for r in got.rows)
    assert "json_match" not in got.summary()


def test_rouge_l_is_the_lcs_f_measure() -> None:
    got = text_scores(
        ["the cat sat", "a b c d", "nothing shared", '{"item": "mug"}'],
        ["the cat sat on the mat", "a c b d", "x y", "item mug"],
    )
    # LCS 3 of 3 predicted, 6 reference tokens: P 1, R 1/2, F 2/3.
    # LCS 3 (a b d) of 4 and 4: F 3/4. Nothing in common: 0.
    # The default tokenizer keeps only alphanumeric runs, so JSON's quotes vanish: 1.
    assert [r.rouge_l for r in got.rows] == pytest.approx([2 / 3, 3 / 4, 0.0, 1.0])
    assert got.rouge_l == pytest.approx((2 / 3 + 3 / 4 + 0 + 1) / 4)


def test_json_match_compares_parsed_values() -> None:
    refs = ['{"a": 1, "b": null}', '{"a": 1}', '{"a": 1}', '{"a": [1, 2]}', "3"]
    preds = [
        '{"b": null,\n "a": 1}',  # key order and whitespace do not matter
        '{"a": true}',  # true is not 1, though Python says True == 1
        'Sure! {"a": 1}',  # text around the object: not JSON
        '{"a": [2, 1]}',  # list order matters
        "3.0",  # the same JSON number
    ]
    got = text_scores(preds, refs)
    assert [r.json_ok for r in got.rows] == [True, False, False, False, True]
    assert got.json_match == pytest.approx(2 / 5)
    assert got.exact_match == 0.0
    assert got.summary() == {
        "exact_match": 0.0,
        "normalized_match": got.normalized_match,
        "rouge_l": got.rouge_l,
        "n": 5,
        "json_match": pytest.approx(0.4),
    }


def test_identical_json_answers_score_one_everywhere() -> None:
    ans = '{"item": "mug", "quantity": 3, "color": "blue", "city": "Oslo", "deadline": null}'
    got = text_scores([ans, ans], [ans, ans])
    assert (got.exact_match, got.normalized_match, got.json_match) == (1.0, 1.0, 1.0)
    assert got.rouge_l == pytest.approx(1.0)


def test_mismatched_or_empty_inputs_are_refused() -> None:
    with pytest.raises(DataError, match="2 predictions for 1 references"):
        text_scores(["a", "b"], ["a"])
    with pytest.raises(DataError, match="no examples"):
        text_scores([], [])


def test_perplexity_is_exp_of_the_loss_and_never_overflows() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(5.0)) == pytest.approx(5.0)
    assert math.isfinite(perplexity(1000.0))  # kiln.json holds no infinities
