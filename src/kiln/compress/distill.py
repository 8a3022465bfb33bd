"""Knowledge distillation: a student learns from a teacher's outputs (Hinton et al. 2015).

Classification: ``alpha * KL(softmax(t/T) || softmax(s/T)) * T² + (1 - alpha) * CE(s, y)``;
regression: ``alpha * MSE(s, teacher) + (1 - alpha) * MSE(s, y)``. The teacher runs once,
in inference mode, over the training inputs; its outputs travel with the labels.

A teacher whose inputs are native (gbdt: NaN for missing values, category codes) gets
a student with its own fitted preprocessing (:func:`student_preprocessor`), since a
network needs imputed, scaled numbers and one-hot categories.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the conventional name

from kiln.data.preprocess import Preprocessor
from kiln.data.preprocess_fit import fit_features
from kiln.data.preprocess_state import CategoricalFeature, PreprocessState
from kiln.data.schema import Column
from kiln.errors import SpecError
from kiln.models.registry import build
from kiln.spec.compress import DistillSettings
from kiln.spec.data import Preprocessing
from kiln.spec.model import TEXT_MODELS, TransformerSpec
from kiln.spec.train import TrainSpec
from kiln.train.loop import FitResult, TensorData, fit_model


class DistillLoss(nn.Module):
    """Targets (B, 1 + K) [label, teacher logits] or (B, 2) [value, teacher value]; plain
    labels (B,) (validation) get the hard loss alone."""

    def __init__(self, task: str, temperature: float, alpha: float) -> None:
        super().__init__()
        self.task = task
        self.t = temperature
        self.alpha = alpha

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            if target.dim() == 1:
                return F.cross_entropy(out, target)
            labels, teacher = target[:, 0].long(), target[:, 1:]
            soft = F.kl_div(
                F.log_softmax(out / self.t, dim=1),
                F.softmax(teacher / self.t, dim=1),
                reduction="batchmean",
            ) * (self.t**2)
            return self.alpha * soft + (1 - self.alpha) * F.cross_entropy(out, labels)
        pred = out.squeeze(-1)
        if target.dim() == 1:
            return F.mse_loss(pred, target)
        soft = F.mse_loss(pred, target[:, 1])
        return self.alpha * soft + (1 - self.alpha) * F.mse_loss(pred, target[:, 0])


def check_student(
    settings: DistillSettings, teacher_kind: str, teacher_model: str, text_length: int = 0
) -> None:
    """The student must read the same inputs as the teacher (same tokens, for text)."""
    student = settings.student
    if (student.type in TEXT_MODELS) != (teacher_kind == "text"):
        raise SpecError(
            f"a {student.type} student cannot learn from a {teacher_model} teacher "
            f"on {teacher_kind} inputs",
            field="steps.distill.student",
        )
    if isinstance(student, TransformerSpec) and student.max_length < text_length:
        raise SpecError(
            f"the student's max_length {student.max_length} is shorter than the teacher's "
            f"inputs ({text_length} tokens)",
            field="steps.distill.student.max_length",
        )


def distill(
    settings: DistillSettings,
    task: str,
    n_inputs: int,
    n_outputs: int,
    context: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    teacher_out: np.ndarray,
    val: tuple[np.ndarray, np.ndarray] | None,
    seed: int,
    target_scale: float,
    device: str = "auto",
) -> tuple[nn.Module, FitResult]:
    """Train a fresh ``settings.student`` on encoded inputs ``x`` with labels ``y`` and
    the teacher's raw outputs; returns the student and its training result."""
    student_context = {k: v for k, v in context.items() if k != "hf_config"}
    torch.manual_seed(seed)
    student = build(settings.student, n_inputs, n_outputs, **student_context)
    if task == "classification":
        target = np.concatenate([y[:, None].astype(np.float32), teacher_out], axis=1)
    else:
        target = np.stack([y.astype(np.float32), teacher_out[:, 0]], axis=1)
    data = TensorData(torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(target)))
    if val is not None:
        data.x_val, data.y_val = torch.from_numpy(val[0]), torch.from_numpy(val[1])
    train = TrainSpec(
        optimizer=settings.optimizer,
        batch_size=settings.batch_size,
        epochs=settings.epochs,
        seed=seed,
        device=device,
    )
    criterion = DistillLoss(task, settings.temperature, settings.alpha)
    loss = "cross_entropy" if task == "classification" else "mse"
    result = fit_model(
        student, data, train, task, loss, criterion=criterion, target_scale=target_scale
    )
    return student, result


def native_inputs(pre: Preprocessor) -> bool:
    """Whether ``pre`` hands the model native inputs (missing kept, category codes)."""
    return any(
        f.native_missing or (isinstance(f, CategoricalFeature) and f.encoding == "native")
        for f in pre.state.features
    )


def student_preprocessor(
    teacher: Preprocessor, spec: Mapping[str, Any] | None, train: pd.DataFrame
) -> Preprocessor:
    """Preprocessing for a network student of a native-input teacher, fitted on the
    training rows ``train``: the teacher spec's ``data.preprocessing`` (``spec`` is its
    lineage document) with each ``native`` setting replaced by the default for networks
    (impute the mean, one-hot categories; scaling as the spec says, standard by
    default). Same columns, same target encoding as the teacher."""
    data = (spec or {}).get("data") or {}
    given = Preprocessing.model_validate(data.get("preprocessing") or {})
    defaults = Preprocessing()
    options = given.model_copy(
        update={
            key: getattr(defaults, key)
            for key in ("missing", "categorical")
            if getattr(given, key) == "native"
        }
    )
    columns = [
        Column(name=f.name, kind="categorical" if isinstance(f, CategoricalFeature) else "numeric")
        for f in teacher.state.features
    ]
    features = fit_features(train, columns, options)
    state = PreprocessState(features=features, target=teacher.state.target, missing=options.missing)
    return Preprocessor(state)
