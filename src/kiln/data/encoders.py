"""One encoder per input kind: raw rows to model inputs, from the fitted state.

:class:`TabularEncoder` (imputed, scaled, one-hot or ordinal features),
:class:`TextEncoder` (token ids) and :class:`ImageEncoder` (normalised pixels), chosen
once by :func:`encoder_for`. Encoding works on whole columns at once, all-numeric
tables on the whole batch in one array operation (:class:`NumericBatch`), and rejects
bad values with a DataError that names the column and the row.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any, Literal, NoReturn, Protocol

import numpy as np
import pandas as pd

from kiln.data.column_values import category, check_finite, first_row, numeric_column
from kiln.data.preprocess_state import (
    CategoricalFeature,
    ImageState,
    InputKind,
    NumericFeature,
    PreprocessState,
    TextState,
)
from kiln.errors import DataError


class Encoder(Protocol):
    """Turns raw rows of one input kind into model inputs (chosen once from the state)."""

    @property
    def kind(self) -> InputKind: ...

    @property
    def columns(self) -> list[str]:
        """The input columns a row must have."""
        ...

    @property
    def row_shape(self) -> list[int]:
        """Shape of one encoded row."""
        ...

    @property
    def width(self) -> int:
        """Width of the encoded input (the model's ``n_inputs``)."""
        ...

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """The model's input batch for ``frame``'s rows; DataError names column and row."""
        ...


class NumericBatch:
    """All-numeric tabular features compiled to arrays: a 2-D batch is imputed and scaled
    in one array operation, giving exactly what the column-by-column pass gives (the
    same float64 operations on the same values)."""

    def __init__(self, features: list[NumericFeature]) -> None:
        self.names = pd.Index([f.name for f in features])
        self.center = np.array([f.center for f in features], dtype=np.float64)
        self.scale = np.array([f.scale for f in features], dtype=np.float64)
        self.fill = np.array([np.nan if f.fill is None else f.fill for f in features])
        # missing: drop refuses a missing value; missing: native keeps it NaN
        self.refused = np.array([not f.accepts_missing for f in features])

    def values(self, frame: pd.DataFrame) -> np.ndarray | None:
        """The features of ``frame`` as float64 (N, F); None when one is missing or not of
        a plain numeric dtype (objects, bools, nullable types)."""
        # Selecting the columns costs more than the arithmetic; skip it when in order.
        if frame.columns.equals(self.names):
            sub = frame
        else:
            try:
                sub = frame[self.names]
            except KeyError:  # a missing column, for the column pass to name
                return None
        if sub.shape[1] != len(self.names):  # repeated column names
            return None
        values = sub.to_numpy()
        if values.dtype.kind not in "iuf":
            return None
        return values.astype(np.float64, copy=False)

    def encode(self, values: np.ndarray) -> np.ndarray | None:
        """float32 (N, F) for float64 ``values`` (N, F); None when a value is refused
        (missing under ``missing: drop``, or infinite), for the column pass to name."""
        nan = np.isnan(values)
        if nan.any():
            if (nan & self.refused).any():
                return None
            values = np.where(nan, self.fill, values)
        if np.isinf(values).any():
            return None
        encoded: np.ndarray = ((values - self.center) / self.scale).astype(np.float32)
        return encoded


_PLAIN_NUMBERS = {int, float}  # exact types: bool (an int subclass) is no number here


def numeric_rows(rows: Sequence[Any], keys: Sequence[Any]) -> np.ndarray | None:
    """Rows of plain ints and floats (what JSON gives) as a float64 (N, F) array, the
    values of each row taken at ``keys`` (column names of dicts, positions of lists);
    None when a row lacks a key or holds anything else (a string, a bool, None...), or
    there are no rows. NaN and infinity pass: the encoder fills or refuses them."""
    if not rows or not keys:
        return None
    # itemgetter and map(type) loop in C: a tenth of the cost of Python loops
    pick = operator.itemgetter(*keys)
    try:
        values = [pick(row) for row in rows]
    except (KeyError, IndexError, TypeError):  # a missing column, a row of another type
        return None
    if len(keys) == 1:  # itemgetter of one key gives the value, not a tuple
        values = [(value,) for value in values]
    if not set(map(type, itertools.chain.from_iterable(values))) <= _PLAIN_NUMBERS:
        return None
    try:
        return np.array(values, dtype=np.float64)
    except OverflowError:  # an int past float64's range: left to the column pass
        return None


class TabularEncoder:
    """Numeric and categorical features: imputed, scaled, one-hot or ordinal codes."""

    kind: Literal["tabular"] = "tabular"

    def __init__(self, features: list[NumericFeature | CategoricalFeature]) -> None:
        self.features = features
        self.columns = [f.name for f in features]
        self.width = sum(
            len(f.categories) if isinstance(f, CategoricalFeature) and f.encoding == "onehot" else 1
            for f in features
        )
        self.row_shape = [self.width]
        numeric = [f for f in features if isinstance(f, NumericFeature)]
        all_numeric = bool(features) and len(numeric) == len(features)
        self.batch = NumericBatch(numeric) if all_numeric else None

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        if self.batch is not None:
            values = self.batch.values(frame)
            encoded = self.batch.encode(values) if values is not None else None
            if encoded is not None:
                return encoded
        return self.encode_columns(frame)

    def encode_matrix(self, values: np.ndarray) -> np.ndarray:
        """Encode (N, F) numbers given in ``columns`` order, as :meth:`encode` encodes the
        table of them (rows numbered from 0 in errors)."""
        if self.batch is not None:
            encoded = self.batch.encode(values.astype(np.float64, copy=False))
            if encoded is not None:
                return encoded
        return self.encode_columns(pd.DataFrame(values, columns=self.columns))

    def encode_columns(self, frame: pd.DataFrame) -> np.ndarray:
        """The column-by-column pass: any table, and the one that names a bad value."""
        missing = [name for name in self.columns if name not in frame.columns]
        if missing:
            raise DataError(f"input is missing column(s) {missing}", field=missing[0])
        blocks: list[np.ndarray] = []
        for feat in self.features:
            if isinstance(feat, NumericFeature):
                blocks.append(_encode_numeric(frame[feat.name], feat)[:, None])
            else:
                blocks.append(_encode_categorical(frame[feat.name], feat))
        if not blocks:
            return np.zeros((len(frame), 0), dtype=np.float32)
        return np.concatenate(blocks, axis=1).astype(np.float32, copy=False)


def _encode_numeric(series: pd.Series, feat: NumericFeature) -> np.ndarray:
    values = numeric_column(series, feat.name)
    nan = np.isnan(values)
    if nan.any() and not feat.native_missing:
        if feat.fill is None:
            _refuse_missing(series, nan, feat.name)
        values = np.where(nan, feat.fill, values)
    check_finite(values, feat.name, series.index)
    return (values - feat.center) / feat.scale


def _encode_categorical(series: pd.Series, feat: CategoricalFeature) -> np.ndarray:
    nan = series.isna().to_numpy()
    if nan.any() and not feat.accepts_missing:
        _refuse_missing(series, nan, feat.name)
    values = series.astype(object).where(~nan, feat.fill).map(category)
    index = {c: i for i, c in enumerate(feat.categories)}
    if feat.encoding == "native":  # missing and unseen go to the trees as missing
        codes_f = np.array(values.map(index).to_numpy(dtype=np.float64, na_value=np.nan))
        codes_f[nan] = np.nan
        return codes_f[:, None]
    # Categories never seen in training: all-zero one-hot, or code -1 for ordinal.
    codes = values.map(index).fillna(-1).to_numpy(dtype=np.int64)
    if feat.encoding == "ordinal":
        return codes.astype(np.float64)[:, None]
    out = np.zeros((len(codes), len(feat.categories)), dtype=np.float64)
    known = codes >= 0
    out[np.flatnonzero(known), codes[known]] = 1.0
    return out


def _refuse_missing(series: pd.Series, nan: np.ndarray, name: str) -> NoReturn:
    row = first_row(series, nan)
    raise DataError(
        f"column {name!r}, row {row}: missing value (missing: drop rejects it)", field=name
    )


class TextEncoder:
    """Text columns joined and tokenized: int64 (N, 2, L) token ids and attention mask."""

    kind: Literal["text"] = "text"

    def __init__(self, state: TextState, tokenizer: Any) -> None:
        self.state = state
        self.tokenizer = tokenizer
        self.columns = list(state.columns)
        self.row_shape = [2, state.max_length]

    @property
    def width(self) -> int:
        """The vocabulary size."""
        return len(self.tokenizer)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        from kiln.data.text import encode, join_text

        texts = join_text(frame, self.state.columns)
        return encode(self.tokenizer, texts, self.state.max_length)


class ImageEncoder:
    """Images decoded from a column: float32 (N, C, H, W), normalised per channel."""

    kind: Literal["image"] = "image"

    def __init__(self, state: ImageState) -> None:
        self.state = state
        self.columns = [state.column]
        h, w = state.size
        self.row_shape = [state.channels, h, w]
        self.width = state.channels * h * w
        self._mean = np.asarray(state.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(state.std, dtype=np.float32).reshape(1, -1, 1, 1)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        from kiln.data.images import decode

        img = self.state
        if img.column not in frame.columns:
            raise DataError(f"input is missing image column {img.column!r}", field=img.column)
        pixels = decode(frame[img.column], img.size, img.channels).astype(np.float32) / 255.0
        return np.ascontiguousarray((pixels - self._mean) / self._std, dtype=np.float32)


def encoder_for(state: PreprocessState, tokenizer: Any = None) -> Encoder:
    """The encoder of the state's input kind."""
    if state.text is not None:
        return TextEncoder(state.text, tokenizer)
    if state.image is not None:
        return ImageEncoder(state.image)
    return TabularEncoder(list(state.features))
