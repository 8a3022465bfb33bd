"""Deployment rows: what a server needs to restore its deployments after a restart.

A row holds the deployment's routes as JSON ``[{version, weight}, ...]`` (aliases
already resolved to numbers) and its :class:`DeploymentConfig` as columns; the serving
side (:mod:`kiln.serve.deployments`) holds the loaded models. Functions take the
caller's session, as the other store modules do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.errors import NotFoundError, SpecError
from kiln.store.registry import get_model, resolve_version
from kiln.store.tables import Deployment, Project, utcnow

Backend = Literal["auto", "torch", "onnx"]


class DeploymentConfig(BaseModel):
    """How a deployment serves: its backend and batching (the row's columns).

    The API validates the ranges (:class:`kiln.api.schemas.DeploymentIn`); the
    defaults here are the API's.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Backend = Field(
        default="auto",
        description="auto: onnxruntime on CPU when it agrees with torch. A generation "
        "model runs on the runtime its bundle records and an embedding model on torch: "
        "auto, or that runtime's name.",
    )
    max_batch_size: int = Field(
        default=32,
        description="Rows a batch closes at; for a generation model, the sequences its "
        "engine decodes at once (max_num_seqs).",
    )
    max_delay_ms: float = Field(
        default=5.0,
        description="The longest a request waits for its batch to fill (classic models).",
    )
    max_queue: int = Field(
        default=256,
        description="Requests waiting beyond it are refused (503); for a generation "
        "model, the sequences waiting for a decoding slot (the engine's queue bound).",
    )
    timeout_ms: float = Field(
        default=10_000.0, description="A request not answered by then is a 504."
    )


CONFIG_FIELDS = tuple(DeploymentConfig.model_fields)


@dataclass(frozen=True)
class RouteSpec:
    """A route as asked for: a version (number, alias or ``latest``) and its weight."""

    version: int | str
    weight: int


@dataclass(frozen=True)
class ResolvedRoute:
    """A route with its version resolved to a number, and that version's bundle."""

    version: int
    weight: int
    version_id: str  # the model version's id (the local cache's name)
    key: str  # the bundle's artifact key


def config_of(row: Deployment) -> DeploymentConfig:
    return DeploymentConfig.model_validate({k: getattr(row, k) for k in CONFIG_FIELDS})


def routes_of(row: Deployment) -> list[RouteSpec]:
    """The row's stored routes (version numbers)."""
    return [RouteSpec(int(r["version"]), int(r["weight"])) for r in row.routes]


def all_deployments(s: Session) -> list[tuple[Deployment, str]]:
    """Every deployment row with its project's name, oldest first."""
    query = (
        select(Deployment, Project.name)
        .join(Project, Project.id == Deployment.project_id)
        .order_by(Deployment.id)
    )
    return [(row, name) for row, name in s.execute(query)]


def resolve_routes(
    s: Session,
    project_id: int,
    model_name: str,
    routes: list[RouteSpec],
    version_field: str | None = None,
) -> list[ResolvedRoute]:
    """Routes with version numbers (aliases resolved now) and their bundles' ids and keys.

    An unknown model or version is a 422 naming the request's field
    (``model``; ``version_field`` or ``routes.<i>.version``).
    """
    if not routes:
        raise SpecError("routes: at least one route", field="routes")
    if sum(r.weight for r in routes) <= 0:
        raise SpecError("routes: the weights must add up to more than 0", field="routes")
    project = s.get(Project, project_id)
    assert project is not None
    try:
        model = get_model(s, project, model_name)
    except NotFoundError as exc:
        raise SpecError(exc.message, field="model") from None
    out = []
    for i, route in enumerate(routes):
        try:
            version = resolve_version(s, model, route.version)
        except NotFoundError as exc:
            raise SpecError(exc.message, field=version_field or f"routes.{i}.version") from None
        out.append(ResolvedRoute(version.version, route.weight, version.id, version.artifact_key))
    if len({r.version for r in out}) != len(out):
        raise SpecError("routes: each version once", field="routes")
    return out


def _stored(resolved: list[ResolvedRoute]) -> list[dict[str, int]]:
    return [{"version": r.version, "weight": r.weight} for r in resolved]


def _row(s: Session, project_id: int, name: str) -> Deployment | None:
    return s.scalar(
        select(Deployment).where(Deployment.project_id == project_id, Deployment.name == name)
    )


def save_deployment(
    s: Session,
    project_id: int,
    name: str,
    model: str,
    resolved: list[ResolvedRoute],
    config: DeploymentConfig,
) -> None:
    """Insert the deployment, or update its routes and settings."""
    row = _row(s, project_id, name)
    columns = config.model_dump()
    if row is None:
        s.add(
            Deployment(
                project_id=project_id, name=name, model=model, routes=_stored(resolved), **columns
            )
        )
        return
    row.routes = _stored(resolved)
    for key, value in columns.items():
        setattr(row, key, value)
    row.updated_at = utcnow()


def remove_deployment(s: Session, project_id: int, name: str) -> None:
    row = _row(s, project_id, name)
    if row is not None:
        s.delete(row)
