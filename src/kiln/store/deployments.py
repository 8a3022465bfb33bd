"""Deployment rows: what a server needs to restore its deployments after a restart.

A row holds the deployment's routes as ``{version, weight}`` (aliases already resolved
to numbers) and its batching settings (:data:`CONFIG_KEYS`); the serving side
(:mod:`kiln.serve.deployments`) holds the loaded models. Functions take the caller's
session, as the other store modules do.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.errors import NotFoundError, SpecError
from kiln.store.registry import get_model, resolve_version
from kiln.store.tables import Deployment, Project, utcnow

CONFIG_KEYS = ("backend", "max_batch_size", "max_delay_ms", "max_queue", "timeout_ms")


def pick_config(body: dict[str, Any]) -> dict[str, Any]:
    """The batching settings given in a request ``body`` (absent ones left out)."""
    return {k: body[k] for k in CONFIG_KEYS if body.get(k) is not None}


def config_of(row: Deployment) -> dict[str, Any]:
    return {k: getattr(row, k) for k in CONFIG_KEYS}


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
    routes: list[dict[str, Any]],
    version_field: str | None = None,
) -> list[dict[str, Any]]:
    """Routes with version numbers (aliases resolved now) and their bundles' ids and keys.

    An unknown model or version is a 422 naming the request's field
    (``model``; ``version_field`` or ``routes.<i>.version``).
    """
    if not routes:
        raise SpecError("routes: at least one route", field="routes")
    if sum(int(r["weight"]) for r in routes) <= 0:
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
            version = resolve_version(s, model, route["version"])
        except NotFoundError as exc:
            raise SpecError(exc.message, field=version_field or f"routes.{i}.version") from None
        out.append(
            {
                "version": version.version,
                "weight": int(route["weight"]),
                "id": version.id,
                "key": version.artifact_key,
            }
        )
    if len({r["version"] for r in out}) != len(out):
        raise SpecError("routes: each version once", field="routes")
    return out


def _stored(resolved: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"version": r["version"], "weight": r["weight"]} for r in resolved]


def _row(s: Session, project_id: int, name: str) -> Deployment | None:
    return s.scalar(
        select(Deployment).where(Deployment.project_id == project_id, Deployment.name == name)
    )


def save_deployment(
    s: Session,
    project_id: int,
    name: str,
    model: str,
    resolved: list[dict[str, Any]],
    config: dict[str, Any],
) -> None:
    """Insert the deployment, or update its routes and settings."""
    row = _row(s, project_id, name)
    if row is None:
        s.add(
            Deployment(
                project_id=project_id, name=name, model=model, routes=_stored(resolved), **config
            )
        )
        return
    row.routes = _stored(resolved)
    for key, value in config.items():
        setattr(row, key, value)
    row.updated_at = utcnow()


def remove_deployment(s: Session, project_id: int, name: str) -> None:
    row = _row(s, project_id, name)
    if row is not None:
        s.delete(row)
