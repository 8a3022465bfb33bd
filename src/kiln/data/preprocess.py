"""Fitted preprocessing: imputation, scaling, categorical and label encoding.

``Preprocessor.fit`` learns its state from the training split only (no leakage);
the state is plain JSON (``preprocess.json`` in a bundle), so loading it executes
nothing. ``transform`` works on whole columns at once and rejects bad values with a
DataError that names the column and the row.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


class Preprocessor:
    """Feature and target encoding with fitted, JSON-serialisable state.

    Text preprocessing also holds a tokenizer (``self.tokenizer``), saved as files
    beside the state.
    """

    def __init__(self, state: PreprocessState, tokenizer: Any = None) -> None:
        self.state = state
        self.tokenizer = tokenizer

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
        if self.state.text is not None:
            return list(self.state.text.columns)
        if self.state.image is not None:
            return [self.state.image.column]
        return [f.name for f in self.state.features]

    @property
    def kind(self) -> Literal["tabular", "text", "image"]:
        if self.state.text is not None:
            return "text"
        return "image" if self.state.image is not None else "tabular"

    @property
    def input_shape(self) -> list[int]:
        """Shape of one encoded row: [features], [C, H, W], or [2, max_length] for text."""
        if self.state.image is not None:
            h, w = self.state.image.size
            return [self.state.image.channels, h, w]
        if self.state.text is not None:
            return [2, self.state.text.max_length]
        return [self.n_outputs]

    @property
    def n_outputs(self) -> int:
        """Width of the encoded input: features, C*H*W pixels, or the vocabulary size."""
        if self.state.image is not None:
            c, h, w = self.input_shape
            return c * h * w
        if self.state.text is not None:
            return len(self.tokenizer)
        return sum(
            len(f.categories) if f.kind == "categorical" and f.encoding == "onehot" else 1
            for f in self.state.features
        )

    @property
    def labels(self) -> list[JSONScalar] | None:
        t = self.state.target
        return t.labels if isinstance(t, ClassTarget) else None

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Encode inputs: float32 (N, F) features, float32 (N, C, H, W) images, or int64
        (N, 2, L) token ids and attention mask."""
        if self.state.text is not None:
            from kiln.data.text import encode, join_text

            texts = join_text(frame, self.state.text.columns)
            return encode(self.tokenizer, texts, self.state.text.max_length)
        if self.state.image is not None:
            from kiln.data.images import decode

            img = self.state.image
            if img.column not in frame.columns:
                raise DataError(f"input is missing image column {img.column!r}", field=img.column)
            pixels = decode(frame[img.column], img.size, img.channels).astype(np.float32) / 255.0
            mean = np.asarray(img.mean, dtype=np.float32).reshape(1, -1, 1, 1)
            std = np.asarray(img.std, dtype=np.float32).reshape(1, -1, 1, 1)
            return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)
        missing = [name for name in self.feature_names if name not in frame.columns]
        if missing:
            raise DataError(f"input is missing column(s) {missing}", field=missing[0])
        blocks: list[np.ndarray] = []
        for feat in self.state.features:
            if isinstance(feat, NumericFeature):
                blocks.append(self._numeric(frame[feat.name], feat)[:, None])
            else:
                blocks.append(self._categorical(frame[feat.name], feat))
        if not blocks:
            return np.zeros((len(frame), 0), dtype=np.float32)
        return np.concatenate(blocks, axis=1).astype(np.float32, copy=False)

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

    def _numeric(self, series: pd.Series, feat: NumericFeature) -> np.ndarray:
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

    def _categorical(self, series: pd.Series, feat: CategoricalFeature) -> np.ndarray:
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

    # ---- persistence ---------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return self.state.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocessor:
        return cls(PreprocessState.model_validate(data))


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
