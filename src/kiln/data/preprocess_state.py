"""The fitted preprocessing state: the ``preprocess.json`` format of a bundle.

Plain pydantic models of plain JSON, so loading a bundle's state executes nothing.
Old bundles must keep loading: a field added here needs a default that means what
those bundles meant.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

JSONScalar = int | float | str | bool

InputKind = Literal["tabular", "text", "image"]


class NumericFeature(BaseModel):
    kind: Literal["numeric"] = "numeric"
    name: str
    fill: float | None  # None: missing values are rejected (missing: drop) or kept (native)
    center: float
    scale: float
    # missing: native: a missing value stays NaN for the model (trees split on it)
    native_missing: bool = False

    @property
    def accepts_missing(self) -> bool:
        """Whether a missing value is filled or passed on (else it is refused)."""
        return self.fill is not None or self.native_missing


class CategoricalFeature(BaseModel):
    kind: Literal["categorical"] = "categorical"
    name: str
    categories: list[str]
    fill: str | None
    # native: float codes into ``categories`` for the model's own categorical splits,
    # with missing and unseen values as NaN
    encoding: Literal["onehot", "ordinal", "native"]
    native_missing: bool = False

    @property
    def accepts_missing(self) -> bool:
        """Whether a missing value is filled or passed on (else it is refused)."""
        return self.fill is not None or self.native_missing


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
