"""What a finished job leaves in the database for its readers: ``Job.result`` and the
``ModelVersion.summary`` of each version it registered.

The API returns both as stored, and the CLI and the dashboard read them, so these
shapes (and their key order) are part of the contract. They are JSON in the database;
the types here say what the runner writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NotRequired, TypedDict

from kiln.evaluate.metrics import Metrics
from kiln.manifest import JSONDocument

JobResult = Mapping[str, object]
"""Any job kind's JSON outcome (a crossval job's is :meth:`CrossValResult.to_dict`)."""


class VersionResult(TypedDict):
    """A train or evaluate job's result: the version it registered or scored."""

    model: str
    version: int
    metrics: dict[str, Metrics] | Metrics  # per split (train) or of the dataset (evaluate)


class VariantResult(TypedDict):
    """One registered variant in a compress job's result."""

    variant: str
    version: int


class CompressJobResult(TypedDict):
    """A compress job's result: its source version and the variants registered from it."""

    model: str
    source_version: int
    variants: list[VariantResult]


class TrainedVersionSummary(TypedDict):
    """``ModelVersion.summary`` of a trained version."""

    model: str  # the architecture's type
    parameters: int
    epochs_run: int
    seconds: float | None
    device: str | None
    importance: NotRequired[list[tuple[str, float]]]  # gbdt: (column, total gain), largest first


class VariantSummary(TypedDict):
    """``ModelVersion.summary`` of a compressed variant."""

    model: str
    parameters: int
    variant: str
    runtime: JSONDocument  # kiln.manifest.Runtime as JSON
    report: JSONDocument  # the variant's compression report (compression.json)
