"""The preprocessing facade: fit on the training split, transform rows, save as JSON.

``Preprocessor.fit`` learns its state from the training split only (no leakage,
:mod:`kiln.data.preprocess_fit`); the state is plain JSON (``preprocess.json`` in a
bundle, :mod:`kiln.data.preprocess_state`), so loading it executes nothing. Inputs go
through the encoder of their kind (:mod:`kiln.data.encoders`), chosen once from the
state; bad values are a DataError that names the column and the row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kiln.data.column_values import check_finite, first_row, native, numeric_column
from kiln.data.encoders import TabularEncoder, TextEncoder, encoder_for
from kiln.data.preprocess_fit import fit_features, fit_image_state, fit_target
from kiln.data.preprocess_state import (
    ClassTarget,
    InputKind,
    JSONScalar,
    PreprocessState,
    RegressionTarget,
    TextState,
)
from kiln.data.schema import Column
from kiln.errors import DataError
from kiln.spec.data import Preprocessing


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
        features = fit_features(frame, columns, options)
        tgt = fit_target(frame, target, task, labels)
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
            target=fit_target(frame, target, task, labels),
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
        image = fit_image_state(frame, column, size, color)
        return cls(PreprocessState(image=image, target=fit_target(frame, target, task, labels)))

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
            row = first_row(series, series.isna().to_numpy())
            raise DataError(f"target column {t.name!r} is empty at row {row}", field=t.name)
        if isinstance(t, ClassTarget):
            return _class_codes(series, t)
        y = numeric_column(series, t.name)
        check_finite(y, t.name, series.index)
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


def _class_codes(series: pd.Series, target: ClassTarget) -> np.ndarray:
    """int64 class indices of a label column; a label unseen in training is a DataError."""
    index = {str(label): i for i, label in enumerate(target.labels)}
    # Normalise like class_labels did (1.0 -> 1) so float-typed columns match.
    codes = series.map(lambda v: str(native(v))).map(index)
    unknown = codes.isna().to_numpy()
    if unknown.any():
        row = first_row(series, unknown)
        raise DataError(
            f"target column {target.name!r}, row {row}: label {series.loc[row]!r} was not "
            f"seen in training (labels: {target.labels})",
            field=target.name,
        )
    return np.array(codes.to_numpy(), dtype=np.int64)
