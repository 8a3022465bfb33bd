"""The SDK's shapes (``kiln.client.shapes``) name exactly the keys the server sends: each
TypedDict against the response model it mirrors."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from kiln.api import schemas
from kiln.api.routes import base_models, usage
from kiln.client import shapes
from kiln.jobs import queue, resources

MIRRORS: list[tuple[Any, type[BaseModel]]] = [
    (shapes.Page, schemas.Page[int]),
    (shapes.ErrorBody, schemas.ErrorBody),
    (shapes.ProjectOut, schemas.ProjectOut),
    (shapes.KeyOut, schemas.KeyOut),
    (shapes.NewKeyOut, schemas.NewKeyOut),
    (shapes.PinnedFile, base_models.PinnedFileOut),
    (shapes.BaseModelOut, base_models.BaseModelOut),
    (shapes.ColumnOut, schemas.ColumnOut),
    (shapes.DatasetOut, schemas.DatasetOut),
    (shapes.ModelVersionRef, schemas.ModelVersionRef),
    (shapes.JobOut, schemas.JobOut),
    (shapes.JobLogOut, schemas.JobLogOut),
    (shapes.VersionOut, schemas.VersionOut),
    (shapes.ModelOut, schemas.ModelOut),
    (shapes.RouteOut, schemas.RouteOut),
    (shapes.DeploymentOut, schemas.DeploymentOut),
    (shapes.PredictOut, schemas.PredictOut),
    (shapes.QuotaOut, usage.QuotaOut),
    (shapes.UsageItem, usage.UsageItem),
    (shapes.UsageOut, usage.UsageOut),
]


def keys(shape: Any) -> set[str]:
    return set(shape.__required_keys__ | shape.__optional_keys__)


@pytest.mark.parametrize(("shape", "model"), MIRRORS, ids=[m.__name__ for _, m in MIRRORS])
def test_a_shape_has_the_keys_of_its_response_model(shape: Any, model: type[BaseModel]) -> None:
    sent = {field.alias or name for name, field in model.model_fields.items()}
    assert keys(shape) == sent


def test_job_documents_have_the_keys_the_workers_write() -> None:
    assert keys(shapes.JobProgress) == keys(queue.Progress)
    assert keys(shapes.JobResources) == keys(resources.Resources)
    assert keys(shapes.AttemptResources) == keys(resources.Attempt)
