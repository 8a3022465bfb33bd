"""The ``data:`` section: where the table comes from and how it is prepared."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from kiln.spec.base import StrictModel

FOLDER_LABEL = "label"  # the label column of an image folder's table
DATASET_PREFIX = "dataset:"  # a server's stored dataset (kiln.store.datasets.PREFIX)


class Preprocessing(StrictModel):
    """How feature columns become numbers. Fitted on the training split only."""

    missing: Literal["drop", "mean", "median", "mode", "constant", "native"] = Field(
        default="mean",
        description="Missing values: drop the row (training) / reject it (prediction), "
        "impute (categorical columns use the mode for mean/median), or native: kept "
        "missing, for models that handle them (gbdt, its default).",
    )
    fill_value: float | str | None = Field(
        default=None, description="The value used by missing: constant."
    )
    scale: Literal["standard", "minmax", "none"] = "standard"
    categorical: Literal["onehot", "ordinal", "native"] = Field(
        default="onehot",
        description="onehot or ordinal codes; native: the model's own categorical "
        "splits (gbdt, its default).",
    )

    @model_validator(mode="after")
    def _constant_needs_value(self) -> Preprocessing:
        if self.missing == "constant" and self.fill_value is None:
            raise ValueError("missing: constant needs fill_value")
        return self


class Split(StrictModel):
    """Holdout split of the rows: test and validation fractions of the whole table."""

    test: float = Field(default=0.2, ge=0.0, lt=1.0)
    val: float = Field(default=0.1, ge=0.0, lt=1.0)
    stratify: bool = Field(
        default=True, description="Keep class proportions (classification; else ignored)."
    )
    seed: int = 0
    key: str | None = Field(
        default=None,
        min_length=1,
        description="data.streaming: the column whose stable hash (with seed) decides each "
        "row's split; default: the row number in the source's file order.",
    )

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> Split:
        if self.test + self.val >= 0.9:
            raise ValueError("test + val must leave at least 10% of rows for training")
        return self


class Augment(StrictModel):
    """Train-time image augmentation (applied per batch on the training split only)."""

    hflip: bool = Field(default=False, description="Random horizontal flip (p=0.5).")
    vflip: bool = Field(default=False, description="Random vertical flip (p=0.5).")
    crop: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Random resized crop keeping >= 1-crop area."
    )
    rotation: float = Field(default=0.0, ge=0.0, le=180.0, description="Max degrees either way.")
    color_jitter: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Brightness/contrast (and saturation) jitter."
    )


class DataSpec(StrictModel):
    """The data: a table (path or fsspec URI to csv/parquet/jsonl, or ``sklearn:<name>``),
    or a folder of images with one sub-folder per class."""

    source: str = Field(min_length=1)
    target: str = Field(
        default=FOLDER_LABEL,
        min_length=1,
        description="The label column; an image folder may omit it (its sub-folder "
        "names become the column label).",
    )
    features: list[str] | None = Field(
        default=None, description="Feature columns; default: every other non-text column."
    )
    text: str | list[str] | None = Field(
        default=None, description="Text column(s) for text models; several are joined."
    )
    image: str | None = Field(
        default=None, description="Column of image paths (relative to the table's folder)."
    )
    image_size: tuple[int, int] | None = Field(
        default=None, description="[height, width] images are resized to; default: the first's."
    )
    color: Literal["auto", "grayscale", "rgb"] = "auto"
    augment: Augment | None = None
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    split: Split = Field(default_factory=Split)
    format: Literal["chat", "completion", "text"] | None = Field(
        default=None,
        description="generation data: chat (messages), completion (prompt/completion) or "
        "text (a text column); inferred from the first record when left out.",
    )
    validation: str | None = Field(
        default=None,
        min_length=1,
        description="generation data: a separate validation set (a path, fsspec URI or "
        "dataset:<id>, in the training data's format); it replaces the val split "
        "(data.split.val is then 0).",
    )
    streaming: bool = Field(
        default=False,
        description="Read a Parquet source (file, directory, glob or s3:// prefix) in "
        "batches, never whole: preprocessing is fitted in one pass over the training "
        "split, which data.split.key (or the row number) decides by a stable hash.",
    )

    @property
    def text_columns(self) -> list[str]:
        if self.text is None:
            return []
        return [self.text] if isinstance(self.text, str) else list(self.text)

    @model_validator(mode="after")
    def _modalities(self) -> DataSpec:
        if self.text is not None and self.image is not None:
            raise ValueError("text and image cannot be combined in one spec")
        if (self.text is not None or self.image is not None) and self.features is not None:
            raise ValueError("features applies to tables; text/image specs use text or image")
        if self.text is not None and not self.text_columns:
            raise ValueError("text must name at least one column")
        if self.augment is not None and self.image is None and not self.maybe_folder:
            raise ValueError("augment applies to images (data.image or an image folder)")
        if self.image_size is not None and min(self.image_size) < 1:
            raise ValueError("image_size must be positive")
        return self

    @model_validator(mode="after")
    def _validation_replaces_val_split(self) -> DataSpec:
        if self.validation is None or self.split.val == 0:
            return self
        if "val" in self.split.model_fields_set:
            raise ValueError(
                "data.split.val: must be 0 with data.validation (that source is the validation set)"
            )
        # the default fraction: the validation source takes its place
        self.split = self.split.model_copy(update={"val": 0.0})
        return self

    @model_validator(mode="after")
    def _key_needs_streaming(self) -> DataSpec:
        if self.split.key is not None and not self.streaming:
            raise ValueError("data.split.key: splits by key with data.streaming only")
        return self

    @property
    def has_validation(self) -> bool:
        """A validation set: a val split of the source, or a separate validation source."""
        return self.split.val > 0 or self.validation is not None

    @property
    def is_image_folder(self) -> bool:
        return _is_folder(self.source)

    @property
    def maybe_folder(self) -> bool:
        """An image folder here, or a server's dataset that may be one (known at run time)."""
        return _is_folder(self.source) or self.source.startswith(DATASET_PREFIX)

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


def _is_folder(source: str) -> bool:
    """A local directory source is an image folder (one sub-folder per class), unless it
    holds Parquet files (a Parquet dataset, partitioned or not)."""
    if "://" in source or source.startswith("sklearn:") or not os.path.isdir(source):
        return False
    return not any(
        n.lower().endswith((".parquet", ".pq")) for _, _, names in os.walk(source) for n in names
    )
