"""Strict, pydantic-validated specs. Depends on nothing else of kiln but errors."""

from kiln.spec.data import Augment, DataSpec, Preprocessing, Split
from kiln.spec.load import dump_spec, load_spec, parse_document, validate
from kiln.spec.model import (
    CNNSpec,
    LinearSpec,
    LoraSpec,
    MLPSpec,
    ModelSpec,
    PretrainedSpec,
    TransformerSpec,
)
from kiln.spec.spec import Spec, Task, metric_mode, monitorable_metrics
from kiln.spec.train import (
    EarlyStopping,
    LRSchedule,
    OptimizerSpec,
    Regularization,
    TrainSpec,
)

__all__ = [
    "Augment",
    "CNNSpec",
    "DataSpec",
    "EarlyStopping",
    "LRSchedule",
    "LinearSpec",
    "LoraSpec",
    "MLPSpec",
    "ModelSpec",
    "OptimizerSpec",
    "Preprocessing",
    "PretrainedSpec",
    "Regularization",
    "Spec",
    "Split",
    "Task",
    "TrainSpec",
    "TransformerSpec",
    "dump_spec",
    "load_spec",
    "metric_mode",
    "monitorable_metrics",
    "parse_document",
    "validate",
]
