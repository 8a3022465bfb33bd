"""The ``data:`` section: where the table comes from and how it is prepared."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kiln.spec.base import StrictModel


class Preprocessing(StrictModel):
    """How feature columns become numbers. Fitted on the training split only."""

    missing: Literal["drop", "mean", "median", "mode", "constant"] = Field(
        default="mean",
        description="Missing values: drop the row (training) / reject it (prediction), "
        "or impute. Categorical columns use the mode for mean/median.",
    )
    fill_value: float | str | None = Field(
        default=None, description="The value used by missing: constant."
    )
    scale: Literal["standard", "minmax", "none"] = "standard"
    categorical: Literal["onehot", "ordinal"] = "onehot"

    @model_validator(mode="after")
    def _constant_needs_value(self) -> Preprocessing:
        if self.missing == "constant" and self.fill_value is None:
            raise ValueError("missing: constant needs fill_value")
        return self


class Split(StrictModel):
    """Holdout split of the rows: test and validation fractions of the whole table."""

    test: float = Field(default=0.2, ge=0.0, lt=1.0)
    val: float = Field(default=0.1, ge=0.0, lt=1.0)
    stratify: bool = Field(default=True, description="Keep class proportions (classification).")
    seed: int = 0

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> Split:
        if self.test + self.val >= 0.9:
            raise ValueError("test + val must leave at least 10% of rows for training")
        return self


class DataSpec(StrictModel):
    """The table: a path or fsspec URI (csv/parquet/jsonl) or ``sklearn:<name>``."""

    source: str = Field(min_length=1)
    target: str = Field(min_length=1)
    features: list[str] | None = Field(
        default=None, description="Feature columns; default: every other non-text column."
    )
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    split: Split = Field(default_factory=Split)

    @model_validator(mode="after")
    def _target_not_a_feature(self) -> DataSpec:
        if self.features is not None:
            if self.target in self.features:
                raise ValueError(f"target column {self.target!r} is also listed in features")
            dupes = sorted({f for f in self.features if self.features.count(f) > 1})
            if dupes:
                raise ValueError(f"features listed twice: {dupes}")
            if not self.features:
                raise ValueError("features must not be empty (omit it to use every column)")
        return self
