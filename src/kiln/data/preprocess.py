"""Fitted preprocessing: imputation, scaling, categorical and label encoding.

``Preprocessor.fit`` learns its state from the training split only (no leakage);
the state is plain JSON (``preprocess.json`` in a bundle), so loading it executes
nothing. Each input kind has its encoder (:class:`TabularEncoder`, :class:`TextEncoder`,
:class:`ImageEncoder`), chosen once from the state. ``transform`` works on whole
columns at once (all-numeric tables: on the whole batch in one array operation) and
rejects bad values with a DataError that names the column and the row.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from kiln.data.schema import Column
from kiln.errors import DataError
from kiln.spec.data import Preprocessing

JSONScalar = int | float | str | bool


class NumericFeature(BaseModel):
    kind: Literal["numeric"] = "numeric"
    name: str
    fill: float | None  # None: missing values are rejected (missing: drop)
    center: float
    scale: float


class CategoricalFeature(BaseModel):
    kind: Literal["categorical"] = "categorical"
    name: str
    categories: list[str]
    fill: str | None
    encoding: Literal["onehot", "ordinal"]


Feature = Annotated[NumericFeature | CategoricalFeature, Field(discriminator="kind")]


class ClassTarget(BaseModel):
    kind: Literal["classification"] = "classification"
    name: str
    labels: list[JSONScalar]


class RegressionTarget(BaseModel):
    kind: Literal["regression"] = "regression"
    name: str
    center: float
    scale: float


Target = Annotated[ClassTarget | RegressionTarget, Field(discriminator="kind")]


class TextState(BaseModel):
    """Text input: which columns, and the truncation length. The tokenizer itself is
    saved beside this state (a bundle's ``tokenizer/`` folder)."""

    columns: list[str]
    max_length: int


class ImageState(BaseModel):
    """Image input: the path column, the size and channels images are decoded to, and
    the per-channel normalisation fitted on the training split (pixels in [0, 1])."""

    column: str
    size: tuple[int, int]
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]


class PreprocessState(BaseModel):
    """Everything needed to turn raw rows into model inputs and back.

    Exactly one input kind is set: tabular ``features``, ``text`` or ``image``.
    """

    format_version: Literal[1] = 1
    features: list[Feature] = []
    text: TextState | None = None
    image: ImageState | None = None
    target: Target
    missing: str = "mean"


InputKind = Literal["tabular", "text", "image"]


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
        self.refused = np.array([f.fill is None for f in features])  # missing: drop

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


class Preprocessor:
    """Feature and target encoding with fitted, JSON-serialisable state.

    Text preprocessing also holds a tokenizer (``self.tokenizer``), saved as files
    beside the state.
    """

    def __init__(self, state: PreprocessState, tokenizer: Any = None) -> None:
        self.state = state
        self.encoder = encoder_for(state, tokenizer)

    @property
    def tokenizer(self) -> Any:
        return self.encoder.tokenizer if isinstance(self.encoder, TextEncoder) else None

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        if isinstance(self.encoder, TextEncoder):
            self.encoder.tokenizer = tokenizer
        elif tokenizer is not None:
            raise TypeError("only text preprocessing holds a tokenizer")

    # ---- fitting -------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        frame: pd.DataFrame,
        columns: list[Column],
        target: str,
        task: str,
        options: Preprocessing,
        labels: list[JSONScalar] | None = None,
    ) -> Preprocessor:
        """Learn the state from ``frame`` (the training split).

        ``labels`` fixes the class set (default: the classes present in ``frame``).
        """
        features: list[NumericFeature | CategoricalFeature] = []
        for col in columns:
            if col.kind == "numeric":
                features.append(_fit_numeric(frame, col.name, options))
            else:
                features.append(_fit_categorical(frame[col.name], col.name, options))
        tgt = _fit_target(frame, target, task, labels)
        return cls(PreprocessState(features=features, target=tgt, missing=options.missing))

    @classmethod
    def fit_text(
        cls,
        frame: pd.DataFrame,
        columns: list[str],
        target: str,
        task: str,
        tokenizer: Any,
        max_length: int,
        labels: list[JSONScalar] | None = None,
    ) -> Preprocessor:
        """Text columns through ``tokenizer`` (already trained or loaded)."""
        state = PreprocessState(
            text=TextState(columns=columns, max_length=max_length),
            target=_fit_target(frame, target, task, labels),
        )
        return cls(state, tokenizer)

    @classmethod
    def fit_image(
        cls,
        frame: pd.DataFrame,
        column: str,
        target: str,
        task: str,
        size: tuple[int, int] | None,
        color: str,
        labels: list[JSONScalar] | None = None,
    ) -> Preprocessor:
        """Images from a path column; mean/std are measured on ``frame`` (training rows)."""
        from kiln.data.images import decode, probe

        if column not in frame.columns:
            raise DataError(f"image column {column!r} is not in the data", field="data.image")
        first_size, first_channels = probe(str(frame[column].iloc[0]), column, frame.index[0])
        channels = {"grayscale": 1, "rgb": 3}.get(color, first_channels)
        hw: tuple[int, int] = (size[0], size[1]) if size is not None else first_size
        pixels = decode(frame[column], hw, channels).astype(np.float32) / 255.0
        mean = pixels.mean(axis=(0, 2, 3))
        std = pixels.std(axis=(0, 2, 3))
        state = PreprocessState(
            image=ImageState(
                column=column,
                size=hw,
                channels=channels,
                mean=[float(m) for m in mean],
                std=[float(s) if s > 1e-6 else 1.0 for s in std],
            ),
            target=_fit_target(frame, target, task, labels),
        )
        return cls(state)

    # ---- transforming --------------------------------------------------------

    @property
    def feature_names(self) -> list[str]:
        """The input columns a row must have."""
        return list(self.encoder.columns)

    @property
    def kind(self) -> InputKind:
        return self.encoder.kind

    @property
    def input_shape(self) -> list[int]:
        """Shape of one encoded row: [features], [C, H, W], or [2, max_length] for text."""
        return list(self.encoder.row_shape)

    @property
    def n_outputs(self) -> int:
        """Width of the encoded input: features, C*H*W pixels, or the vocabulary size."""
        return self.encoder.width

    @property
    def numeric_columns(self) -> list[str] | None:
        """The input columns when every one is a numeric feature (then
        :meth:`transform_matrix` takes a plain 2-D batch), else None."""
        encoder = self.encoder
        if isinstance(encoder, TabularEncoder) and encoder.batch is not None:
            return list(encoder.columns)
        return None

    @property
    def labels(self) -> list[JSONScalar] | None:
        t = self.state.target
        return t.labels if isinstance(t, ClassTarget) else None

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Encode inputs: float32 (N, F) features, float32 (N, C, H, W) images, or int64
        (N, 2, L) token ids and attention mask."""
        return self.encoder.encode(frame)

    def transform_matrix(self, values: np.ndarray) -> np.ndarray:
        """Encode a tabular batch given as numbers (N, F) in ``feature_names`` order,
        exactly as :meth:`transform` encodes the table of them; missing values (NaN) are
        filled or refused as there, naming the column and the row (counted from 0)."""
        if not isinstance(self.encoder, TabularEncoder):
            raise DataError(f"a {self.kind} model takes a table, not a matrix", field="inputs")
        return self.encoder.encode_matrix(values)

    def transform_target(self, series: pd.Series) -> np.ndarray:
        """Encode the target: class indices (int64) or a standardized float32 vector."""
        t = self.state.target
        if series.isna().any():
            row = _row(series, series.isna().to_numpy())
            raise DataError(f"target column {t.name!r} is empty at row {row}", field=t.name)
        if isinstance(t, ClassTarget):
            index = {str(label): i for i, label in enumerate(t.labels)}
            # Normalise like class_labels did (1.0 -> 1) so float-typed columns match.
            codes = series.map(lambda v: str(_native(v))).map(index)
            unknown = codes.isna().to_numpy()
            if unknown.any():
                row = _row(series, unknown)
                raise DataError(
                    f"target column {t.name!r}, row {row}: label {series.loc[row]!r} was not "
                    f"seen in training (labels: {t.labels})",
                    field=t.name,
                )
            return np.array(codes.to_numpy(), dtype=np.int64)
        y = _numeric_column(series, t.name)
        _check_finite(y, t.name, series.index)
        return np.array((y - t.center) / t.scale, dtype=np.float32)

    def inverse_target(self, values: np.ndarray) -> np.ndarray:
        """Undo target scaling for regression outputs."""
        t = self.state.target
        assert isinstance(t, RegressionTarget)
        return values * t.scale + t.center

    # ---- persistence ---------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return self.state.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocessor:
        return cls(PreprocessState.model_validate(data))


def _encode_numeric(series: pd.Series, feat: NumericFeature) -> np.ndarray:
    values = _numeric_column(series, feat.name)
    nan = np.isnan(values)
    if nan.any():
        if feat.fill is None:
            row = _row(series, nan)
            raise DataError(
                f"column {feat.name!r}, row {row}: missing value (missing: drop rejects it)",
                field=feat.name,
            )
        values = np.where(nan, feat.fill, values)
    _check_finite(values, feat.name, series.index)
    return (values - feat.center) / feat.scale


def _encode_categorical(series: pd.Series, feat: CategoricalFeature) -> np.ndarray:
    nan = series.isna().to_numpy()
    if nan.any() and feat.fill is None:
        row = _row(series, nan)
        raise DataError(
            f"column {feat.name!r}, row {row}: missing value (missing: drop rejects it)",
            field=feat.name,
        )
    values = series.astype(object).where(~nan, feat.fill).map(_category)
    index = {c: i for i, c in enumerate(feat.categories)}
    # Categories never seen in training: all-zero one-hot, or code -1 for ordinal.
    codes = values.map(index).fillna(-1).to_numpy(dtype=np.int64)
    if feat.encoding == "ordinal":
        return codes.astype(np.float64)[:, None]
    out = np.zeros((len(codes), len(feat.categories)), dtype=np.float64)
    known = codes >= 0
    out[np.flatnonzero(known), codes[known]] = 1.0
    return out


def _numeric_column(series: pd.Series, name: str) -> np.ndarray:
    """Column as float64; a value that is present but not a number is a DataError."""
    if pd.api.types.is_bool_dtype(series):
        return series.astype(np.float64).to_numpy()
    coerced = pd.to_numeric(series, errors="coerce")
    bad = coerced.isna().to_numpy() & series.notna().to_numpy()
    if bad.any():
        row = _row(series, bad)
        raise DataError(
            f"column {name!r}, row {row}: {series.loc[row]!r} is not a number", field=name
        )
    return coerced.to_numpy(dtype=np.float64, na_value=np.nan)


def _row(series: pd.Series, mask: np.ndarray) -> Any:
    """The table's label of the first row where ``mask`` is set (rows keep their number
    from the table through splits, so messages point at the row the user can find)."""
    label = series.index[int(np.flatnonzero(mask)[0])]
    return label.item() if isinstance(label, np.generic) else label


def _check_finite(values: np.ndarray, name: str, index: pd.Index | None = None) -> None:
    inf = np.isinf(values)
    if inf.any():
        pos = int(np.flatnonzero(inf)[0])
        row = index[pos] if index is not None else pos
        raise DataError(f"column {name!r}, row {row}: value is infinite", field=name)


def _fit_numeric(frame: pd.DataFrame, name: str, options: Preprocessing) -> NumericFeature:
    values = _numeric_column(frame[name], name)
    _check_finite(values, name, frame.index)
    present = values[~np.isnan(values)]
    if present.size == 0:
        raise DataError(f"column {name!r} has no values in the training split", field=name)
    fill: float | None
    if options.missing == "drop":
        fill = None
    elif options.missing == "mean":
        fill = float(present.mean())
    elif options.missing == "median":
        fill = float(np.median(present))
    elif options.missing == "mode":
        fill = float(pd.Series(present).mode().iloc[0])
    else:
        try:
            fill = float(options.fill_value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DataError(
                f"fill_value {options.fill_value!r} is not a number but column {name!r} is",
                field="data.preprocessing.fill_value",
            ) from None
    filled = np.where(np.isnan(values), fill if fill is not None else np.nan, values)
    filled = filled[~np.isnan(filled)]
    if options.scale == "standard":
        center, scale = float(filled.mean()), float(filled.std())
    elif options.scale == "minmax":
        center, scale = float(filled.min()), float(filled.max() - filled.min())
    else:
        center, scale = 0.0, 1.0
    # A constant column would divide by zero; it carries no signal either way.
    return NumericFeature(name=name, fill=fill, center=center, scale=scale or 1.0)


def _category(value: Any) -> str:
    """A category's name: 1, 1.0 and "1" are the same category (CSV readers disagree)."""
    return str(_native(value))


def _fit_categorical(series: pd.Series, name: str, options: Preprocessing) -> CategoricalFeature:
    present = series.dropna().map(_category)
    if present.empty:
        raise DataError(f"column {name!r} has no values in the training split", field=name)
    fill: str | None
    if options.missing == "drop":
        fill = None
    elif options.missing == "constant":
        fill = str(options.fill_value)
    else:
        fill = str(present.mode().iloc[0])
    categories = sorted(set(present) | ({fill} if fill is not None else set()))
    return CategoricalFeature(
        name=name, categories=categories, fill=fill, encoding=options.categorical
    )


def _fit_target(
    frame: pd.DataFrame, target: str, task: str, labels: list[JSONScalar] | None
) -> ClassTarget | RegressionTarget:
    if task == "classification":
        return ClassTarget(name=target, labels=labels or class_labels(frame[target]))
    y = _numeric_column(frame[target], target).astype(np.float64)
    _check_finite(y, target)
    std = float(y.std())
    return RegressionTarget(name=target, center=float(y.mean()), scale=std or 1.0)


def class_labels(series: pd.Series) -> list[JSONScalar]:
    """The sorted distinct values of a target column, as JSON scalars (at least two)."""
    present = series.dropna()
    if present.empty:
        raise DataError(f"target column {series.name!r} has no values", field=str(series.name))
    uniques = present.unique().tolist()
    try:
        labels = sorted(uniques)
    except TypeError:
        labels = sorted(uniques, key=str)
    if len(labels) < 2:
        raise DataError(
            f"target column {series.name!r} has a single class {labels}; classification "
            "needs at least two",
            field=str(series.name),
        )
    return [_native(v) for v in labels]


def _native(value: Any) -> JSONScalar:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value  # type: ignore[no-any-return]
