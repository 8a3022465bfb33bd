"""The tabular recipe for tree models: native preprocessing, then boosting.

Trees take numbers unscaled, missing values as NaN and categories as codes split on
natively (``Spec.preprocessing`` gives those defaults for gbdt), so the fitted
preprocessing is the same JSON state as for any table, and the bundle serves like
any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from kiln.data.column_values import category
from kiln.data.preprocess import Preprocessor
from kiln.data.preprocess_state import CategoricalFeature
from kiln.models.gbdt import GBDTModel
from kiln.models.registry import build
from kiln.spec.spec import Spec
from kiln.train.boosting import Problem, fit_gbdt
from kiln.train.callbacks import Callback
from kiln.train.loop import TensorData
from kiln.train.recipe import Table, Trained


def train_trees(
    spec: Spec,
    table: Table,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    *,
    callbacks: Sequence[Callback] = (),
) -> Trained:
    """Fit the preprocessing on ``train``, boost the trees (validating on ``val``)."""
    target = spec.data.target
    pre = Preprocessor.fit(
        train, table.columns, target, spec.task, spec.preprocessing, labels=table.labels
    )
    data = TensorData(
        x_train=torch.from_numpy(pre.transform(train)),
        y_train=torch.from_numpy(pre.transform_target(train[target])),
    )
    if val is not None and len(val):
        data.x_val = torch.from_numpy(pre.transform(val))
        data.y_val = torch.from_numpy(pre.transform_target(val[target]))
    labels = table.labels
    context = tree_context(pre, spec.task)
    model = build(spec.model, pre.n_outputs, len(labels) if labels else 1, **context)
    assert isinstance(model, GBDTModel)
    problem = Problem(
        task=spec.task,
        classes=len(labels) if labels else 0,
        loss=spec.resolved_loss,
        target_scale=float(getattr(pre.state.target, "scale", 1.0)),
        labels=tuple(category(label) for label in labels or []),
    )
    result = fit_gbdt(model, data, spec.train, problem, callbacks=callbacks)
    return Trained(model=model, preprocessor=pre, result=result, context=context)


def tree_context(pre: Preprocessor, task: str) -> dict[str, object]:
    """The model context a gbdt bundle stores: the task, which encoded columns hold
    category codes, and every encoded column's name (one-hot columns as
    ``column=category``)."""
    names: list[str] = []
    categorical: list[int] = []
    for feat in pre.state.features:
        if isinstance(feat, CategoricalFeature) and feat.encoding == "onehot":
            names.extend(f"{feat.name}={c}" for c in feat.categories)
            continue
        if isinstance(feat, CategoricalFeature) and feat.encoding == "native":
            categorical.append(len(names))
        names.append(feat.name)
    return {"task": task, "categorical": categorical, "feature_names": names}
