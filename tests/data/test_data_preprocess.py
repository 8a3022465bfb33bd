"""Fitted preprocessing: imputation, scaling, encoding, validation, JSON state."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kiln.data.encoders import ImageEncoder, TabularEncoder, TextEncoder
from kiln.data.preprocess import Preprocessor
from kiln.data.preprocess_fit import class_labels
from kiln.data.preprocess_state import ClassTarget, ImageState, PreprocessState, TextState
from kiln.data.schema import Column
from kiln.errors import DataError
from kiln.spec import Preprocessing

COLUMNS = [Column(name="n", kind="numeric"), Column(name="c", kind="categorical")]


def table() -> pd.DataFrame:
    """Present values of n are 1, 2, 2, 7: mean 3, median 2, mode 2."""
    return pd.DataFrame(
        {
            "n": [1.0, 2.0, 2.0, np.nan, 7.0],
            "c": ["a", "b", "a", None, "c"],
            "y": ["no", "yes", "no", "yes", "no"],
        }
    )


def fit(frame=None, task="classification", target="y", **options) -> Preprocessor:
    frame = table() if frame is None else frame
    return Preprocessor.fit(frame, COLUMNS, target, task, Preprocessing(**options))


def numeric(pre: Preprocessor):
    return pre.state.features[0]


def categorical(pre: Preprocessor):
    return pre.state.features[1]


# ---- fitting: statistics come from the frame given, and only from it ---------------


def test_scaling_statistics_come_from_the_training_frame_only():
    whole = pd.DataFrame({"n": np.arange(100.0), "c": ["a", "b"] * 50, "y": ["p", "q"] * 50})
    train = whole.iloc[:20]
    pre = Preprocessor.fit(train, COLUMNS, "y", "classification", Preprocessing())
    feat = numeric(pre)
    assert feat.center == pytest.approx(train["n"].mean())  # 9.5, not 49.5
    assert feat.scale == pytest.approx(train["n"].std(ddof=0))
    assert feat.fill == pytest.approx(9.5)
    # Rows from the rest of the table are transformed with the training statistics.
    out = pre.transform(whole.iloc[[99]])
    assert out[0, 0] == pytest.approx((99 - 9.5) / train["n"].std(ddof=0), rel=1e-6)


@pytest.mark.parametrize(
    ("missing", "extra", "num_fill", "cat_fill"),
    [
        ("mean", {}, 3.0, "a"),
        ("median", {}, 2.0, "a"),
        ("mode", {}, 2.0, "a"),
        ("constant", {"fill_value": -5}, -5.0, "-5.0"),
        ("drop", {}, None, None),
    ],
)
def test_missing_value_strategies(missing, extra, num_fill, cat_fill):
    pre = fit(missing=missing, scale="none", **extra)
    assert numeric(pre).fill == num_fill
    assert categorical(pre).fill == cat_fill
    row = pd.DataFrame({"n": [np.nan], "c": [None]})
    if missing == "drop":
        with pytest.raises(DataError) as info:
            pre.transform(row)
        assert info.value.field == "n"
        assert "row 0" in info.value.message
        with pytest.raises(DataError, match="'c', row 0: missing value"):
            pre.transform(pd.DataFrame({"n": [1.0], "c": [None]}))
    else:
        out = pre.transform(row)
        assert out[0, 0] == pytest.approx(num_fill)
        cats = categorical(pre).categories
        assert out[0, 1:].tolist() == [1.0 if c == cat_fill else 0.0 for c in cats]


def test_constant_fill_for_categories_becomes_a_category():
    frame = table()[["c", "y"]]
    options = Preprocessing(missing="constant", fill_value="missing")
    pre = Preprocessor.fit(frame, COLUMNS[1:], "y", "classification", options)
    feat = pre.state.features[0]
    assert feat.categories == ["a", "b", "c", "missing"]
    out = pre.transform(pd.DataFrame({"c": [None]}))
    assert out.tolist() == [[0.0, 0.0, 0.0, 1.0]]


def test_string_fill_value_for_a_numeric_column_is_rejected():
    with pytest.raises(DataError) as info:
        fit(missing="constant", fill_value="none")
    assert info.value.field == "data.preprocessing.fill_value"
    assert "'n'" in info.value.message


def test_scale_standard():
    pre = fit(missing="mean", scale="standard")
    col = pre.transform(table())[:, 0]
    assert col.mean() == pytest.approx(0.0, abs=1e-6)
    assert col.std() == pytest.approx(1.0, abs=1e-6)
    assert numeric(pre).center == pytest.approx(3.0)
    assert numeric(pre).scale == pytest.approx(np.sqrt(4.4))


def test_scale_minmax():
    pre = fit(missing="mean", scale="minmax")
    col = pre.transform(table())[:, 0]
    assert col.min() == pytest.approx(0.0)
    assert col.max() == pytest.approx(1.0)
    assert (numeric(pre).center, numeric(pre).scale) == (1.0, 6.0)


def test_scale_none_keeps_values():
    pre = fit(missing="median", scale="none")
    col = pre.transform(table())[:, 0]
    np.testing.assert_allclose(col, [1.0, 2.0, 2.0, 2.0, 7.0])


def test_constant_column_does_not_divide_by_zero():
    frame = pd.DataFrame({"n": [4.0] * 4, "c": list("abab"), "y": list("pqpq")})
    for scale in ("standard", "minmax"):
        pre = Preprocessor.fit(frame, COLUMNS, "y", "classification", Preprocessing(scale=scale))
        assert np.isfinite(pre.transform(frame)).all()


# ---- categorical encoding --------------------------------------------------------


def test_onehot_encoding_and_unknown_category():
    pre = fit(categorical="onehot")
    feat = categorical(pre)
    assert feat.categories == ["a", "b", "c"]
    assert pre.n_outputs == 1 + 3
    out = pre.transform(pd.DataFrame({"n": [1.0, 1.0, 1.0], "c": ["b", "zzz", "c"]}))
    assert out.dtype == np.float32
    assert out[:, 1:].tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 1]]


def test_ordinal_encoding_and_unknown_category():
    pre = fit(categorical="ordinal")
    assert pre.n_outputs == 2
    out = pre.transform(pd.DataFrame({"n": [1.0, 1.0, 1.0], "c": ["b", "zzz", "a"]}))
    assert out[:, 1].tolist() == [1.0, -1.0, 0.0]


def test_categories_come_from_training_rows_only():
    pre = fit(frame=table().iloc[:3])
    assert categorical(pre).categories == ["a", "b"]


# ---- bad values ------------------------------------------------------------------


def test_non_numeric_value_in_numeric_column_names_column_and_row():
    pre = fit()
    bad = pd.DataFrame({"n": [1.0, 2.0, "abc"], "c": ["a", "a", "a"]}, dtype=object)
    with pytest.raises(DataError) as info:
        pre.transform(bad)
    assert info.value.field == "n"
    assert "column 'n', row 2: 'abc' is not a number" in info.value.message


def test_numeric_strings_are_accepted():
    pre = fit(scale="none")
    out = pre.transform(pd.DataFrame({"n": ["1.5", "2"], "c": ["a", "b"]}))
    np.testing.assert_allclose(out[:, 0], [1.5, 2.0])


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_values_are_rejected(value):
    pre = fit()
    with pytest.raises(DataError) as info:
        pre.transform(pd.DataFrame({"n": [1.0, value], "c": ["a", "a"]}))
    assert info.value.field == "n"
    assert "row 1: value is infinite" in info.value.message
    frame = table()
    frame.loc[2, "n"] = value
    with pytest.raises(DataError, match="infinite"):
        fit(frame=frame)


def test_missing_column_is_named():
    pre = fit()
    with pytest.raises(DataError) as info:
        pre.transform(pd.DataFrame({"n": [1.0]}))
    assert info.value.field == "c"
    assert "'c'" in info.value.message


def test_empty_training_column_is_rejected():
    frame = table().assign(n=np.nan)
    with pytest.raises(DataError, match="'n' has no values"):
        fit(frame=frame)


# ---- targets -----------------------------------------------------------------------


def test_classification_target_encoding():
    pre = fit()
    assert pre.labels == ["no", "yes"]
    np.testing.assert_array_equal(pre.transform_target(table()["y"]), [0, 1, 0, 1, 0])
    with pytest.raises(DataError) as info:
        pre.transform_target(pd.Series(["no", "maybe"], name="y"))
    assert "row 1" in info.value.message
    assert "'maybe'" in info.value.message
    with pytest.raises(DataError, match="empty at row 1"):
        pre.transform_target(pd.Series(["no", None], name="y"))


def test_integer_class_labels():
    frame = table().assign(y=[3, 1, 3, 1, 2])
    pre = fit(frame=frame)
    assert pre.labels == [1, 2, 3]
    np.testing.assert_array_equal(pre.transform_target(frame["y"]), [2, 0, 2, 0, 1])


def test_float_typed_integer_class_labels():
    frame = table().assign(y=[1.0, 0.0, 1.0, 0.0, 1.0])
    pre = fit(frame=frame)
    np.testing.assert_array_equal(pre.transform_target(frame["y"]), [1, 0, 1, 0, 1])


def test_regression_target_is_standardised_and_inverted():
    frame = table().assign(y=[10.0, 20.0, 30.0, 40.0, 50.0])
    pre = fit(frame=frame, task="regression")
    assert pre.labels is None
    encoded = pre.transform_target(frame["y"])
    assert encoded.mean() == pytest.approx(0.0, abs=1e-6)
    assert encoded.std() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(pre.inverse_target(encoded.astype(np.float64)), frame["y"])
    with pytest.raises(DataError, match="'y', row 1: 'x' is not a number"):
        pre.transform_target(pd.Series([1.0, "x"], name="y", dtype=object))


def test_class_labels_needs_two_classes():
    with pytest.raises(DataError, match="single class"):
        class_labels(pd.Series(["a", "a", None], name="y"))
    assert class_labels(pd.Series([2, 1, 2], name="y")) == [1, 2]


# ---- persistence ---------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_state_json_round_trip(task):
    frame = table() if task == "classification" else table().assign(y=[1.0, 2, 3, 4, 5])
    pre = fit(frame=frame, task=task, scale="minmax", categorical="ordinal")
    text = json.dumps(pre.to_json())
    again = Preprocessor.from_json(json.loads(text))
    assert again.to_json() == pre.to_json()
    probe = pd.DataFrame({"n": [0.5, np.nan, 9.0], "c": ["c", "a", "new"]})
    np.testing.assert_array_equal(again.transform(probe), pre.transform(probe))
    assert again.feature_names == ["n", "c"]


# ---- one encoder per input kind --------------------------------------------------


def test_each_input_kind_has_its_encoder():
    pre = fit()
    assert isinstance(pre.encoder, TabularEncoder) and pre.kind == "tabular"
    assert pre.numeric_columns is None  # a categorical column: the column pass
    numeric_only = Preprocessor.fit(table(), COLUMNS[:1], "y", "classification", Preprocessing())
    assert numeric_only.numeric_columns == ["n"]  # all numeric: transform_matrix's batch
    assert pre.n_outputs == 1 + 3 and pre.input_shape == [4]
    image = PreprocessState(
        image=ImageState(column="file", size=(4, 6), channels=3, mean=[0.5] * 3, std=[0.2] * 3),
        target=ClassTarget(name="y", labels=["a", "b"]),
    )
    pre = Preprocessor.from_json(image.model_dump(mode="json"))
    assert isinstance(pre.encoder, ImageEncoder) and pre.kind == "image"
    assert (pre.feature_names, pre.input_shape, pre.n_outputs) == (["file"], [3, 4, 6], 72)
    assert pre.tokenizer is None
    with pytest.raises(DataError, match="takes a table"):
        pre.transform_matrix(np.zeros((1, 1)))
    text = PreprocessState(
        text=TextState(columns=["a", "b"], max_length=16),
        target=ClassTarget(name="y", labels=["a", "b"]),
    )
    pre = Preprocessor(text, tokenizer=["tok"] * 30)  # the width is the vocabulary's size
    assert isinstance(pre.encoder, TextEncoder) and pre.kind == "text"
    assert (pre.feature_names, pre.input_shape, pre.n_outputs) == (["a", "b"], [2, 16], 30)
